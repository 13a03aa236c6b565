"""Per-layer change under adaptation: relative weight change and linear CKA."""

from __future__ import annotations

import pytest
import torch

from sharebone.models import create_backbone
from sharebone.models.analysis import (
    format_layer_table,
    layer_activations,
    layer_change,
    layer_groups,
    linear_cka,
    plot_layer_change,
)


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
    rows = layer_change(a, a, torch.rand(6, 1, 28, 28))
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


# -- the scripts: compare_regimes, multitask_relatedness, layer_change ---------------------------


def load_script(name: str):
    import importlib.util

    from helpers.configs import REPO_ROOT

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("compare")
    rows = load_script("compare_regimes").main(
        ["--quick", "--regimes", "protonet,pretrain,multitask", "--out", str(out),
         "--wandb", "offline", "--name", "cmp-test"])
    return out, rows


def test_compare_regimes_scores_every_regime_on_identical_episodes(comparison):
    import csv

    out, rows = comparison
    assert [r["regime"] for r in rows] == ["protonet", "pretrain", "multitask"]
    assert len({r["episodes_sha"] for r in rows}) == 1
    with open(out / "comparison.csv") as f:
        saved = list(csv.DictReader(f))
    assert [r["regime"] for r in saved] == ["protonet", "pretrain", "multitask"]
    assert {"shared_params", "task_specific_params", "5w1s", "5w1s_ci95", "20w5s",
            "train_seconds"} <= set(saved[0])
    table = (out / "comparison.md").read_text()
    assert table.startswith("| regime | shared params | task-specific params | 5w1s (%)")
    assert "| multitask | " in table and "fingerprint" in table
    assert (out / "accuracy_vs_shots.png").stat().st_size > 1000
    assert list((out / "wandb").glob("offline-run-*"))  # the table and plot went to W&B


def test_compare_regimes_needs_a_budget():
    with pytest.raises(SystemExit):
        load_script("compare_regimes").parse_args(["--task", "omniglot_small"])


def test_compare_regimes_refuses_steps_that_validation_would_not_see(capsys):
    # 150 steps, validation every 100: best.ckpt, which every row is scored from, would never
    # hold the last 50 (a run stopped by max_steps mid-epoch is not validated again).
    script = load_script("compare_regimes")
    with pytest.raises(SystemExit):
        script.parse_args(["--steps", "150"])
    assert "--steps 150 is not a multiple of --batches-per-epoch 100" in capsys.readouterr().err
    assert script.parse_args(["--steps", "150", "--batches-per-epoch", "50"]).steps == 150
    assert script.parse_args(["--budget-seconds", "60"]).steps is None  # time stops validate
    assert script.parse_args(["--quick", "--steps", "3"]).batches_per_epoch == 1


def test_compare_regimes_refuses_a_name_that_cannot_name_runs(capsys):
    with pytest.raises(SystemExit):
        load_script("compare_regimes").parse_args(["--quick", "--name", "my comparison"])
    assert "--name 'my comparison': use letters, digits" in capsys.readouterr().err


def wandb_records(run_dir) -> list[dict]:
    import json

    from helpers.wandb_service import leet_inspect

    return [json.loads(line) for line in leet_inspect(run_dir, "--json").splitlines()]


def only_wandb_run(folder):
    runs = list((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_compare_regimes_logs_a_run_per_regime_in_one_group_with_curves(comparison):
    import json

    from helpers.wandb_service import leet_inspect

    out, rows = comparison
    for row in rows:
        regime = row["regime"]
        run_dir = only_wandb_run(out / regime)
        records = wandb_records(run_dir)
        run = next(r["run"] for r in records if r["type"] == "run")
        assert (run["run_group"], run["display_name"], run["job_type"]) == \
            ("cmp-test", f"{regime}-cmp-test", "train")
        summary = json.loads(leet_inspect(run_dir, "--summary", "--json"))
        config = summary["config"]
        assert config["regime"]["name"] == regime
        assert {k: config["comparison"][k] for k in ("name", "task", "steps", "seed",
                                                      "test_seed", "episodes")} == {
            "name": "cmp-test", "task": "synthetic_images", "steps": 4, "seed": 0,
            "test_seed": 0, "episodes": 6}
        history = [r["history"]["item"] for r in records if r["type"] == "history"]
        curve = {i["trainer/global_step"] for i in history if "train/loss" in i}
        assert len(curve) >= 3, f"{regime}: train/loss over steps, got steps {curve}"
        assert len([i for i in history if "val/acc" in i]) >= 2, f"{regime}: val/acc curve"
        for n, k in [(5, 1), (20, 5)]:
            assert summary["summary"][f"test/{n}w{k}s/acc"] == pytest.approx(row[f"{n}w{k}s"])


def test_compare_regimes_logs_a_summary_run_with_the_table(comparison):
    import json

    from helpers.wandb_service import leet_inspect

    out, rows = comparison
    run_dir = only_wandb_run(out)
    run = next(r["run"] for r in wandb_records(run_dir) if r["type"] == "run")
    assert (run["run_group"], run["display_name"], run["job_type"]) == \
        ("cmp-test", "cmp-test-summary", "summary")
    summary = json.loads(leet_inspect(run_dir, "--summary", "--json"))
    assert summary["config"]["comparison"]["regimes"] == ["protonet", "pretrain", "multitask"]
    assert summary["config"]["comparison"]["steps"] == 4
    table = summary["summary"]["comparison"]
    saved = json.loads((run_dir / "files" / table["path"]).read_text())
    logged = [dict(zip(saved["columns"], r, strict=True)) for r in saved["data"]]
    assert [r["regime"] for r in logged] == ["protonet", "pretrain", "multitask"]
    assert [r["20w5s"] for r in logged] == pytest.approx([r["20w5s"] for r in rows])
    assert summary["summary"]["accuracy_vs_shots"]["_type"].startswith("image")


def test_layer_change_script_adapts_and_compares(comparison, tmp_path):
    out, _ = comparison
    script = load_script("layer_change")
    rows = script.main(["--checkpoint", str(out / "pretrain"), "--task", "synthetic_images",
                        "--episodes", "2", "--steps", "3", "--out", str(tmp_path / "adapt")])
    assert [r["layer"] for r in rows] == ["layers.0", "layers.2", "layers.4"]
    assert all(r["relative_change"] > 0 for r in rows)
    rows = script.main(["--checkpoint", str(out / "pretrain"), "--compare", str(out / "pretrain"),
                        "--task", "synthetic_images", "--episodes", "2",
                        "--out", str(tmp_path / "same")])
    assert [r["relative_change"] for r in rows] == [0.0] * 3
    assert (tmp_path / "same" / "layer_change.png").is_file()


def test_multitask_relatedness_quick(tmp_path):
    pytest.importorskip("matplotlib")
    rows = load_script("multitask_relatedness").main(
        ["--quick", "--weightings", "equal,pcgrad", "--out", str(tmp_path)])
    assert {(r["relatedness"], r["method"]) for r in rows} == {
        (r, m) for r in (0.0, 1.0) for m in ("single-task", "equal", "pcgrad")}
    assert all(r["test_mse"] > 0 for r in rows)
    assert (tmp_path / "relatedness.md").read_text().startswith("| relatedness | single-task MSE")


def test_compare_regimes_has_a_row_for_each_method_papers_compare_against(tmp_path):
    """Reptile, iMAML, R2D2 and Baseline++ (a pretrain variant: its own row, its own run).
    Reptile and iMAML rows run as MAML's do; R2D2 and the variant are run here."""
    pytest.importorskip("matplotlib")
    script = load_script("compare_regimes")
    assert {"reptile", "imaml", "r2d2", "baseline_pp"} <= set(script.available_regimes(None))
    assert script.REGIME_OVERRIDES["reptile"] == script.REGIME_OVERRIDES["imaml"] == \
        script.MAML_LIKE
    rows = script.main(["--quick", "--steps", "2", "--episodes", "2", "--regimes",
                        "r2d2,baseline_pp", "--out", str(tmp_path), "--wandb", "disabled"])
    assert [r["regime"] for r in rows] == ["r2d2", "baseline_pp"]
    assert len({r["episodes_sha"] for r in rows}) == 1
    table = (tmp_path / "comparison.md").read_text()
    assert "| r2d2 | " in table and "| baseline_pp | " in table
    from sharebone.regimes import load_regime

    baseline_pp = load_regime(tmp_path / "baseline_pp" / "checkpoints" / "last.ckpt")
    assert baseline_pp.hparams.classifier == "cosine"
