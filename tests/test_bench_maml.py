"""scripts/bench_maml.py runs end to end (tiny settings): learn2learn beside sharebone, equal
float64 meta-gradients first, on the backbone asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_maml.py"


def test_the_benchmark_compares_with_learn2learn_on_the_backbone_asked_for(tmp_path):
    pytest.importorskip("learn2learn", reason="the baseline: bash scripts/install_learn2learn.sh")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--backbone", "conv4_84", "--hidden", "4", "--device",
         "cpu", "--iters", "1", "--warmup", "0", "--repeats", "1", "--settings", "2w1s1q:2",
         "--orders", "1", "--threads", "1", "--impls", "learn2learn,sharebone",
         "--out", str(tmp_path / "bench.json")],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "conv4-4 84x84x3" in out.stdout  # the header names what was measured
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["grad_difference"] < 1e-8  # same meta-gradient as learn2learn (float64)
    assert {r["impl"] for r in report["results"]} == {"learn2learn", "sharebone"}
    assert all(r["tasks_per_s"] > 0 and r["setting"] == "2w1s1q:2" for r in report["results"])
    assert "| 2w1s1q:2 | 1 | sharebone |" in out.stdout


def test_real_omniglot_is_refused_for_an_84px_backbone():
    out = subprocess.run([sys.executable, str(SCRIPT), "--backbone", "resnet12", "--data", "real"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "use it with --backbone conv4" in out.stderr


def test_a_preset_keeps_the_options_given_and_reports_tensor_memory_on_a_cpu(tmp_path):
    """``--warmup 1`` is the parser's default too, but given, it beats the preset's 3. On a CPU
    every run reports its peak tensor memory (PeakMemory), and the meta-batch that fits in the
    budget where memory grows with the tasks (one vmap), not where it does not (the loop)."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "issue12", "--device", "cpu", "--hidden", "4",
         "--iters", "1", "--warmup", "1", "--repeats", "1", "--settings", "2w1s1q:2",
         "--orders", "2", "--threads", "1", "--impls", "sharebone-vmap,sharebone",
         "--fit-gb", "1", "--data", "random", "--out", str(tmp_path / "bench.json")],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1 timed meta-batches after 1" in out.stdout
    results = {r["impl"]: r for r in json.loads((tmp_path / "bench.json").read_text())["results"]}
    vmap, loop = results["sharebone-vmap"], results["sharebone"]
    assert vmap["grows_with_meta_batch"] and not loop["grows_with_meta_batch"]
    assert 0 < loop["tensor_peak_mb"] < vmap["tensor_peak_mb"]  # two tasks' graphs at once
    fits = int(1024 // (vmap["tensor_peak_mb"] / 2))  # --fit-gb 1: 1 GiB
    assert f"| ~{fits} |" in out.stdout and "| sharebone | " in out.stdout
    assert out.stdout.rstrip().endswith("| any |")  # the loop's row, last
