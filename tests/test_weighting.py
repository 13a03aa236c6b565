"""Loss weightings and gradient aggregations: each checked against its paper's rule."""

from __future__ import annotations

import pytest
import torch

from sharebone.regimes.weighting import (
    WEIGHTINGS,
    NonFiniteWeightError,
    check_finite,
    cosine_matrix,
    create_weighting,
)

LOSSES = torch.tensor([1.0, 2.0, 0.5])


def gramian_of(jacobian: torch.Tensor) -> torch.Tensor:
    return jacobian @ jacobian.T


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_every_weighting_gives_one_finite_weight_per_task(name):
    weighting = create_weighting(name, num_tasks=3)
    jacobian = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    weights = weighting(LOSSES, gramian_of(jacobian))
    assert weights.shape == (3,) and bool(torch.isfinite(weights).all())


def test_the_registry_holds_at_least_the_issue_strategies():
    assert {"equal", "uncertainty", "gradnorm", "pcgrad", "dwa", "mgda", "imtl"} <= set(
        WEIGHTINGS.names())


def test_unknown_weighting_lists_the_known_ones():
    with pytest.raises(KeyError, match="Unknown weighting 'nope'.*pcgrad"):
        create_weighting("nope", num_tasks=2)


def test_equal_weights_are_ones():
    assert create_weighting("equal", num_tasks=3)(LOSSES).tolist() == [1.0, 1.0, 1.0]


def test_uncertainty_weights_are_inverse_variances_and_learn_them():
    weighting = create_weighting("uncertainty", num_tasks=3)
    with torch.no_grad():
        weighting.log_variance.copy_(torch.tensor([0.0, 1.0, -1.0]))
    weights = weighting(LOSSES)
    assert torch.allclose(weights, torch.exp(-torch.tensor([0.0, 1.0, -1.0])))
    objective = (weights * LOSSES).sum() + weighting.penalty()
    objective.backward()
    # d/ds [exp(-s) L + s/2] = -exp(-s) L + 1/2
    expected = -torch.exp(-weighting.log_variance.detach()) * LOSSES + 0.5
    assert torch.allclose(weighting.log_variance.grad, expected)


def test_dwa_is_equal_until_two_epochs_then_favours_the_slow_task():
    weighting = create_weighting("dwa", num_tasks=2, temperature=2.0)
    assert weighting(torch.tensor([1.0, 1.0])).tolist() == [1.0, 1.0]
    weighting.end_epoch()
    weighting(torch.tensor([0.5, 1.0]))  # task 0 halves its loss, task 1 does not
    weighting.end_epoch()
    weights = weighting(torch.tensor([0.5, 1.0]))
    ratio = torch.tensor([0.5, 1.0])
    assert torch.allclose(weights, 2 * torch.softmax(ratio / 2.0, 0))
    assert weights[1] > weights[0] and weights.sum().item() == pytest.approx(2.0)


def test_dwa_with_a_step_period_updates_without_epochs():
    weighting = create_weighting("dwa", num_tasks=2, period=1)
    weighting(torch.tensor([1.0, 1.0]))
    weighting(torch.tensor([0.5, 1.0]))
    assert weighting(torch.tensor([0.5, 1.0]))[1] > 1.0


def test_gradnorm_moves_weight_away_from_the_task_with_the_larger_gradient():
    weighting = create_weighting("gradnorm", num_tasks=2, alpha=1.5, lr=0.1)
    jacobian = torch.tensor([[10.0, 0.0], [0.0, 1.0]])  # task 0: 10x the gradient norm
    first = weighting(torch.tensor([1.0, 1.0]), gramian_of(jacobian))
    second = weighting(torch.tensor([1.0, 1.0]), gramian_of(jacobian))
    assert first.tolist() == [1.0, 1.0]
    assert second[0] < 1.0 < second[1] and second.sum().item() == pytest.approx(2.0)


def test_pcgrad_projects_conflicting_gradients_as_in_algorithm_1():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    jacobian = torch.stack([g1, g2])
    weights = create_weighting("pcgrad", num_tasks=2)(torch.ones(2), gramian_of(jacobian))
    # g1 projected off g2 and g2 off g1 (their dot product is negative), then summed.
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    assert torch.allclose(weights @ jacobian, p1 + p2)


def test_pcgrad_leaves_agreeing_gradients_alone():
    jacobian = torch.tensor([[1.0, 0.2], [0.5, 1.0]])
    weights = create_weighting("pcgrad", num_tasks=2)(torch.ones(2), gramian_of(jacobian))
    assert weights.tolist() == [1.0, 1.0]


def test_mgda_finds_the_min_norm_convex_combination():
    jacobian = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    weights = create_weighting("mgda", num_tasks=2)(torch.ones(2), gramian_of(jacobian))
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-4)
    # min over a in [0,1] of ||a e1 + (1-a) 3 e2||: a = 9/10
    assert weights[0].item() == pytest.approx(0.9, abs=1e-2)
    direction = weights @ jacobian
    assert bool((jacobian @ direction >= -1e-6).all())  # a common descent direction


def test_imtl_update_has_equal_projections_on_every_task_direction():
    jacobian = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.5], [1.0, 1.0, 0.0]])
    weights = create_weighting("imtl", num_tasks=3)(torch.ones(3), gramian_of(jacobian))
    update = weights @ jacobian
    projections = (jacobian / jacobian.norm(dim=1, keepdim=True)) @ update
    assert torch.allclose(projections, projections[0].expand(3), atol=1e-4)


def test_aggregations_leave_heads_alone_and_loss_weightings_do_not():
    assert not create_weighting("pcgrad", num_tasks=2).weighs_heads
    assert create_weighting("uncertainty", num_tasks=2).weighs_heads


def test_non_finite_weights_name_the_task():
    with pytest.raises(NonFiniteWeightError, match=r"task\(s\) Greek=inf.*learning rate"):
        check_finite(torch.tensor([1.0, float("inf"), 0.5]), ["Latin", "Greek", "Korean"],
                     "weight")
    check_finite(torch.ones(2), ["a", "b"], "weight")  # fine values pass


def test_cosine_matrix_of_a_gramian():
    jacobian = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    cosine = cosine_matrix(gramian_of(jacobian))
    assert cosine[0, 1].item() == pytest.approx(2**-0.5)
    assert torch.allclose(cosine.diagonal(), torch.ones(2))
