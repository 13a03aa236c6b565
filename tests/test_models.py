"""Backbones and the registry: every backbone trains, counts add up, names resolve."""

from __future__ import annotations

import pytest
import torch

from sharebone.models import BACKBONES, Registry, create_backbone
from sharebone.models.sharing import ParameterSharing, count_parameters

INPUTS = {"conv4": (1, 28, 28), "mlp": (784,)}


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_gives_num_features_and_gradients_everywhere(name):
    torch.manual_seed(0)
    model = create_backbone(name)
    x = torch.randn(6, *INPUTS[name])
    features = model(x)
    assert features.shape == (6, model.num_features)
    assert torch.isfinite(features).all()
    features.pow(2).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{pname} got no gradient"


def test_conv4_matches_the_papers_net():
    model = create_backbone("conv4", in_channels=1, hidden=64, image_size=28)
    assert model.num_features == 64
    # 4 conv layers (3x3) + 4 batch norms: 111,936 parameters for 1-channel input.
    assert count_parameters(model) == (9 * 64 + 64) + 3 * (9 * 64 * 64 + 64) + 4 * 128
    assert create_backbone("conv4", in_channels=3, image_size=84).num_features == 1600


def test_conv4_refuses_an_image_too_small_to_pool():
    with pytest.raises(ValueError, match="too small"):
        create_backbone("conv4", image_size=8)


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(KeyError, match="Unknown backbone 'resnet999'. Known: conv4, mlp"):
        create_backbone("resnet999")


def test_registering_a_name_twice_warns():
    reg = Registry("thing")
    reg.register("a")(lambda: 1)
    with pytest.warns(UserWarning, match="registered twice"):
        reg.register("a")(lambda: 2)
    assert reg.create("a") == 2


def test_parameter_sharing_reads_well():
    text = str(ParameterSharing(shared=1000, task_specific=10, meta=5, description="x"))
    assert text == "shared=1,000  task-specific=10  meta=5  (x)"
