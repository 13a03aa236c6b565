"""Per-layer change under adaptation: relative weight change and linear CKA."""

from __future__ import annotations

import pytest
import torch

from sharebone.analysis import (
    format_layer_table,
    layer_activations,
    layer_change,
    layer_groups,
    linear_cka,
    plot_layer_change,
)
from sharebone.models import create_backbone


def test_linear_cka_is_one_for_rotations_and_scalings_and_low_for_unrelated():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, 5 * x @ q + 3) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, torch.randn(200, 16, generator=g)) < 0.2
    assert linear_cka(x, x[:, :8]) < 1.0  # keeping half the features changes the kernel


def test_conv4_layers_are_its_blocks_with_their_batch_norms():
    backbone = create_backbone("conv4")
    groups = layer_groups(backbone)
    assert [g.name for g in groups] == [f"blocks.{i}" for i in range(4)]
    assert sum(len(g.parameters()) for g in groups) == len(list(backbone.parameters()))
    acts = layer_activations(backbone, torch.rand(3, 1, 28, 28))
    assert [tuple(a.shape) for a in acts] == [(3, 64, 14, 14), (3, 64, 7, 7), (3, 64, 3, 3),
                                              (3, 64, 1, 1)]


def test_mlp_batch_norm_joins_its_linear_layer():
    groups = layer_groups(create_backbone("mlp", in_features=4, hidden=[8, 4], batch_norm=True))
    assert [(g.name, len(g.modules)) for g in groups] == [("layers.0", 2), ("layers.3", 2)]


def test_an_unchanged_backbone_shows_no_change():
    a = create_backbone("conv4")
    rows = layer_change(a, a, torch.rand(16, 1, 28, 28))
    assert [r["relative_change"] for r in rows] == [0.0] * 4
    assert [r["cka"] for r in rows] == pytest.approx([1.0] * 4)


def test_a_retrained_top_layer_shows_up_in_that_layer_only():
    torch.manual_seed(0)
    a = create_backbone("mlp", in_features=6, hidden=[16, 16])
    b = create_backbone("mlp", in_features=6, hidden=[16, 16])
    b.layers[0].load_state_dict(a.layers[0].state_dict())  # bottom shared, top re-initialised
    rows = layer_change(a, b, torch.randn(64, 6))
    assert rows[0]["relative_change"] == 0.0 and rows[0]["cka"] == pytest.approx(1.0)
    assert rows[1]["relative_change"] > 0.5 and rows[1]["cka"] < 0.95


def test_different_architectures_are_refused():
    with pytest.raises(ValueError, match="different layers"):
        layer_change(create_backbone("conv4"), create_backbone("mlp"))


def test_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    a = create_backbone("mlp", in_features=4, hidden=[8, 4])
    rows = [{"run": "same", **r} for r in layer_change(a, a, torch.randn(10, 4))]
    table = format_layer_table(rows)
    assert table.splitlines()[0] == "| run | layer | params | relative change | linear CKA |"
    assert "| same | layers.0 | 40 | 0.0000 | 1.0000 |" in table
    plot_layer_change(rows, str(tmp_path / "layers.png"))
    assert (tmp_path / "layers.png").stat().st_size > 1000
