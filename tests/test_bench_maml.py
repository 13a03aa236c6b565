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
