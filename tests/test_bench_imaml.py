"""scripts/bench_imaml.py runs end to end (tiny settings): MAML and iMAML side by side, peak
memory per inner_steps, iMAML's flat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_imaml.py"


def test_the_benchmark_reports_memory_and_time_per_inner_steps(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--hidden", "4", "--steps", "1,4", "--iters", "1",
         "--warmup", "0", "--meta-batch", "2", "--threads", "1", "--out",
         str(tmp_path / "bench.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "conv4-4 28x28x1, 5-way 1-shot 15-query, meta-batch 2" in out.stdout
    rows = {(r["impl"], r["inner_steps"]): r
            for r in json.loads((tmp_path / "bench.json").read_text())["results"]}
    assert set(rows) == {("maml", 1), ("maml", 4), ("imaml", 1), ("imaml", 4)}
    assert all(r["peak_mb"] > 0 and r["seconds_per_meta_batch"] > 0 for r in rows.values())
    assert rows[("imaml", 4)]["peak_mb"] <= 1.05 * rows[("imaml", 1)]["peak_mb"]
    assert rows[("maml", 4)]["peak_mb"] > rows[("maml", 1)]["peak_mb"]
    assert "| imaml | 4 | " in out.stdout
