"""scripts/sharing_study.py: every preset, one table and one figure, for MAML and ProtoNet."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys

import pytest
from helpers.configs import REPO_ROOT
from helpers.wandb_service import leet_inspect


def _script():
    sys.path.insert(0, str(REPO_ROOT / "scripts"))  # it imports compare_regimes beside it
    spec = importlib.util.spec_from_file_location("sharing_study",
                                                  REPO_ROOT / "scripts" / "sharing_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("study")
    rows = _script().main(["--quick", "--presets", "head,film", "--out", str(out),
                           "--wandb", "offline", "--name", "study-test"])
    return out, rows


def test_the_study_has_a_row_per_regime_and_preset_with_its_task_specific_count(study):
    out, rows = study
    assert [(r["regime"], r["preset"]) for r in rows] == [
        ("maml", "head"), ("maml", "film"), ("protonet", "head"), ("protonet", "film")]
    by = {(r["regime"], r["preset"]): r for r in rows}
    # conv4 at hidden 8, 5 ways: the head is 8 * 5 + 5; FiLM adds 2 x 8 per norm, 4 norms.
    assert by["maml", "head"]["task_params"] == 45
    assert by["maml", "film"]["adapter_params"] == by["protonet", "film"]["adapter_params"] == 64
    assert by["maml", "film"]["task_params"] == 45 + 64
    assert by["protonet", "head"]["task_params"] == 0   # its head is fitted, nothing adapts
    assert by["protonet", "film"]["task_params"] == 64
    assert all(r["chosen"].startswith("test_inner_steps=") for r in rows[:2])
    assert by["protonet", "film"]["chosen"].startswith("test_steps=")
    with open(out / "sharing_study.csv") as f:
        assert [r["preset"] for r in csv.DictReader(f)] == ["head", "film", "head", "film"]
    table = (out / "sharing_study.md").read_text()
    assert table.startswith("| regime | preset | task-specific params | adapter params | 5w1s")
    assert (out / "accuracy_vs_task_params.png").stat().st_size > 1000


def test_the_study_lands_on_wandb_as_a_summary_run_with_its_table_and_figure(study):
    out, rows = study
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    summary = json.loads(leet_inspect(runs[0], "--summary", "--json"))
    assert summary["config"]["sharing_study"]["presets"] == ["head", "film"]
    table = summary["summary"]["sharing_study"]
    saved = json.loads((runs[0] / "files" / table["path"]).read_text())
    logged = [dict(zip(saved["columns"], r, strict=True)) for r in saved["data"]]
    assert [r["5w1s"] for r in logged] == pytest.approx([r["5w1s"] for r in rows])
    assert summary["summary"]["accuracy_vs_task_params"]["_type"].startswith("image")


def test_the_study_refuses_an_unknown_preset(capsys):
    with pytest.raises(SystemExit):
        _script().parse_args(["--steps", "3", "--presets", "head,films"])
    assert "--presets: unknown ['films']" in capsys.readouterr().err


def test_the_study_refuses_steps_that_no_validation_would_see(capsys):
    # 150 steps, validation every 100: best.ckpt would never hold the last 50.
    with pytest.raises(SystemExit):
        _script().parse_args(["--steps", "150"])
    assert "--steps 150 is not a multiple of --batches-per-epoch 100" in capsys.readouterr().err
    assert _script().parse_args(["--steps", "150", "--batches-per-epoch", "50"]).steps == 150


def test_a_maml_preset_whose_head_does_not_adapt_is_scored_at_its_training_ways_only(tmp_path):
    script = _script()
    args = script.parse_args(["--steps", "100", "--settings", "5w1s,20w1s"])
    scorable = {}
    for regime, preset in [("maml", "body"), ("maml", "bias"), ("maml", "film"),
                           ("protonet", "body")]:
        cfg = script.compose_run(script.base_overrides(args) + [
            f"regime={regime}", f"sharing={preset}"], tmp_path / preset)
        scorable[regime, preset] = script.scorable(cfg, args.settings)
    assert scorable["maml", "body"] == scorable["maml", "bias"] == [(5, 1)]
    assert scorable["maml", "film"] == scorable["protonet", "body"] == [(5, 1), (20, 1)]
    row = script.row_of("maml", "body", {"5w1s": (0.7, 0.02), "20w1s": (float("nan"),) * 2},
                        {"adapt": 10}, 0, None, 1.0)
    table = script.markdown([row], args)
    assert "| maml | body | 10 | 0 | 70.00 ± 2.00 | - | - |" in table
    assert "-: not scored" in table and "chance by construction" in table
