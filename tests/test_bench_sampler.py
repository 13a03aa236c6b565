"""scripts/bench_sampler.py runs end to end (--quick, random data) and reports every row.

Structure only: timings belong to the benchmark itself, never to assertions here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_sampler.py"
HAS_L2L = importlib.util.find_spec("learn2learn") is not None
CONFIGS = {"5-way 1-shot 15-query", "20-way 1-shot 5-query"}
OURS = {"sharebone, meta-batch 1", "sharebone, meta-batch 32"}
L2L = "learn2learn TaskDataset, 1 task"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sampler", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_rows(result: dict, samplers: set[str]) -> None:
    rows = result["rows"]
    expected = {(c, s) for c in CONFIGS for s in samplers}
    assert {(r["config"], r["sampler"]) for r in rows} == expected
    assert len(rows) == len(CONFIGS) * len(samplers)
    for r in rows:
        assert r["episodes_per_s"] > 0
        assert len(r["runs_episodes_per_s"]) == result["meta"]["repeats"]
        assert all(x > 0 for x in r["runs_episodes_per_s"])
        assert r["episodes_per_run"] == r["calls_per_run"] * r["episodes_per_call"]


@pytest.mark.l2l
@pytest.mark.skipif(not HAS_L2L, reason="learn2learn not installed")
def test_quick_run_with_l2l(bench, tmp_path: Path, capsys) -> None:
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    result = bench.main(["--random-data", "--quick", "--json", str(out)])
    assert torch.get_num_threads() == threads  # main restores the caller's setting
    _check_rows(result, OURS | {L2L})
    assert result["meta"]["learn2learn"] is not None
    assert result["meta"]["threads"] == 1
    assert "random" in result["meta"]["data"]
    for r in result["rows"]:
        assert r["ratio_vs_l2l"] > 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    text = capsys.readouterr().out
    assert "| config | sampler |" in text
    assert text.count(f"| {L2L} |") == 2 and text.count("| sharebone, meta-batch 32 |") == 2
    assert "RANDOM" in text.upper() and "Goals:" in text


def test_quick_run_without_l2l(bench, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "learn2learn", None)  # `import learn2learn` fails
    result = bench.main(["--random-data", "--quick", "--threads", "2"])
    _check_rows(result, OURS)
    assert result["meta"]["learn2learn"] is None
    assert result["meta"]["threads"] == 2
    assert all("ratio_vs_l2l" not in r for r in result["rows"])
    captured = capsys.readouterr()
    assert "NOT INSTALLED" in captured.out
    assert "learn2learn not importable" in captured.err


def test_bench_image_folder_reports_the_ceiling_beside_the_sampler(tmp_path: Path) -> None:
    """scripts/bench_image_folder.py --quick: the sampler, the index_select ceiling, the
    fresh-page and memcpy rows, and the sampler as a fraction of the ceiling."""
    path = SCRIPT.parent / "bench_image_folder.py"
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_image_folder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "folder.json"
    result = module.main(["--images", "200", "--classes", "10", "--quick", "--no-l2l",
                          "--no-rss", "--source-size", "84x84", "--root", str(tmp_path / "d"),
                          "--json", str(out)])
    whats = [r["what"] for r in result["episodes"]]
    assert whats[0].startswith("sharebone EpisodeSampler, meta-batch 32")
    assert any(w.startswith("ceiling: torch.index_select") for w in whats)
    assert any("fresh memory" in w for w in whats) and any("memcpy" in w for w in whats)
    ceiling = next(r for r in result["episodes"] if r["what"].startswith("ceiling"))
    ratio = result["episodes"][0]["episodes_per_s"] / ceiling["episodes_per_s"]
    assert result["sampler_over_ceiling"] == pytest.approx(ratio)
    assert json.loads(out.read_text())["sampler_over_ceiling"] == pytest.approx(ratio)
    assert result["rss"] == []


def test_variable_shapes_are_timed_against_a_copy_of_the_same_bytes(bench, tmp_path: Path):
    """--variable: Meta-Dataset-shaped meta-batches and the two copies, as ratios."""
    out = tmp_path / "variable.json"
    result = bench.main(["--variable", "--quick", "--classes", "8", "--per-class", "12",
                         "--meta-batches", "1,2", "--repeats", "1", "--json", str(out)])
    rows = result["variable"]
    assert [r["meta_batch"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r["meta_batches_per_s"]) == {"sampler", "copy, fresh memory",
                                                "copy, reused buffer"}
        assert r["sampler_over_fresh_copy"] == pytest.approx(
            r["meta_batches_per_s"]["copy, fresh memory"] / r["meta_batches_per_s"]["sampler"])
        assert 5 <= min(r["example_ways"]) and max(r["example_ways"]) <= 8
    assert json.loads(out.read_text())["variable"][0]["calls"] == rows[0]["calls"]
