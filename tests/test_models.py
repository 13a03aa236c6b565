"""Backbones and the registry: counts add up, names resolve (every backbone trains:
tests/test_backbones.py)."""

from __future__ import annotations

import pytest

from sharebone.models import Registry, create_backbone
from sharebone.models.sharing import ParameterSharing, count_parameters


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
    with pytest.raises(KeyError, match="Unknown backbone 'resnet999'. Known: conv4, mlp, "):
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
