"""The inner loop alone: hand-computed references for each of its options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sharebone.adaptation import adapt, check_inner_loop


def linear_problem(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(3, 4, generator=g, dtype=dtype).requires_grad_(),
              "b": torch.randn(3, generator=g, dtype=dtype).requires_grad_()}
    xs, ys = torch.randn(6, 4, generator=g, dtype=dtype), torch.randint(0, 3, (6,), generator=g)
    xq, yq = torch.randn(9, 4, generator=g, dtype=dtype), torch.randint(0, 3, (9,), generator=g)

    def loss(p, x, y):
        return F.cross_entropy(x @ p["w"].T + p["b"], y)

    return params, (lambda p, step: loss(p, xs, ys)), (lambda p: loss(p, xq, yq))


def meta_grads(params, query_loss, adapted):
    return torch.autograd.grad(query_loss(adapted), list(params.values()))


def test_zero_steps_returns_the_initial_parameters():
    params, support, _ = linear_problem()
    out = adapt(support, params, steps=0, step_sizes=0.1)
    assert all(out[k] is params[k] for k in params)


def test_one_step_is_gradient_descent_and_leaves_inputs_untouched():
    params, support, _ = linear_problem()
    before = {k: v.detach().clone() for k, v in params.items()}
    grads = torch.autograd.grad(support(params, 0), list(params.values()))
    out = adapt(support, params, steps=1, step_sizes=0.3)
    for (k, p), g in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(out[k], p - 0.3 * g)
        assert torch.equal(p, before[k])


@pytest.mark.parametrize("functional", [False, True], ids=["autograd", "torch.func"])
def test_second_order_meta_gradient_matches_an_unrolled_reference(functional):
    params, support, query = linear_problem()
    adapted = adapt(support, params, steps=2, step_sizes=0.5, functional=functional)
    ours = meta_grads(params, query, adapted)
    # Reference: two steps unrolled by hand with create_graph=True.
    p = dict(params)
    for _ in range(2):
        g = torch.autograd.grad(support(p, 0), list(p.values()), create_graph=True)
        p = {k: v - 0.5 * gi for (k, v), gi in zip(p.items(), g, strict=True)}
    ref = meta_grads(params, query, p)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("functional", [False, True], ids=["autograd", "torch.func"])
def test_first_order_meta_gradient_is_the_query_gradient_at_the_adapted_parameters(functional):
    params, support, query = linear_problem()
    adapted = adapt(support, params, steps=1, step_sizes=0.5, first_order=True,
                    functional=functional)
    ours = meta_grads(params, query, adapted)
    at = {k: v.detach().requires_grad_() for k, v in adapted.items()}
    ref = torch.autograd.grad(query(at), list(at.values()))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # ... and differs from the second-order one.
    second = meta_grads(params, query, adapt(support, params, 1, 0.5, first_order=False))
    assert not torch.allclose(ours[0], second[0])


def test_meta_sgd_step_sizes_get_minus_support_grad_times_query_grad():
    params, support, query = linear_problem()
    alpha = {k: torch.full_like(v, 0.1).requires_grad_() for k, v in params.items()}
    adapted = adapt(support, params, steps=1, step_sizes=alpha, first_order=True)
    got = torch.autograd.grad(query(adapted), list(alpha.values()))
    g_support = torch.autograd.grad(support(params, 0), list(params.values()))
    at = {k: v.detach().requires_grad_() for k, v in adapted.items()}
    g_query = torch.autograd.grad(query(at), list(at.values()))
    for a, gs, gq in zip(got, g_support, g_query, strict=True):
        torch.testing.assert_close(a, -gs * gq)


def test_step_index_is_passed_to_the_support_loss():
    seen = []

    def loss(p, step):
        seen.append(step)
        return (p["w"] ** 2).sum()

    adapt(loss, {"w": torch.ones(2, requires_grad=True)}, steps=3, step_sizes=0.1)
    assert seen == [0, 1, 2]


@pytest.mark.parametrize("steps, lr, training, match", [
    (1, 0.0, True, "inner_lr must be > 0"),
    (1, -0.1, True, "inner_lr must be > 0"),
    (1, math.nan, True, "inner_lr must be > 0"),
    (0, 0.1, True, "set test_inner_steps=0"),
    (-1, 0.1, False, "inner_steps must be an integer >= 0"),
    (1.5, 0.1, True, "inner_steps must be an integer"),
])
def test_bad_inner_loop_settings_are_rejected_with_a_hint(steps, lr, training, match):
    with pytest.raises(ValueError, match=match):
        check_inner_loop(steps, lr, training=training)


def test_zero_steps_are_fine_at_test_time():
    check_inner_loop(0, 0.1, training=False)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        adapt(lambda p, s: p["w"].sum(), {"w": torch.ones(1)}, steps=-1, step_sizes=0.1)


def test_meta_gradients_accumulated_part_by_part_equal_one_backward_whatever_the_parts():
    """One task per part (the loop) or several (a vmapped chunk): the same loss value and the
    same gradient as one backward through the mean loss of the whole meta-batch."""
    from sharebone.adaptation import accumulate_meta_gradients

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(5, 6, 4, generator=g, dtype=torch.float64), torch.randn(5, 6, 3,
                                                                             generator=g)

    def part(rows):
        outputs = x[rows] @ w
        return (outputs - y[rows]).pow(2).mean(), outputs

    whole, _ = part(slice(0, 5))
    want = torch.autograd.grad(whole, [w])[0]
    for sizes in ([1] * 5, [2, 2, 1], [5]):
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        parts = (part(slice(s, s + n)) for s, n in zip(starts, sizes, strict=True))
        w.grad = None
        loss, outputs = accumulate_meta_gradients(parts, [w], num_tasks=5)
        loss.backward()
        torch.testing.assert_close(loss.detach(), whole.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(w.grad, want, rtol=0, atol=1e-12)
        assert outputs.shape == (5, 6, 3) and not outputs.requires_grad
    with pytest.raises(ValueError, match="held 4 tasks, but num_tasks=5"):
        accumulate_meta_gradients((part(slice(0, 4)),), [w], num_tasks=5)
