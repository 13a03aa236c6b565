"""scripts/bench_loop.py runs end to end (tiny settings): the bare step beside sharebone-train
on the same config, and the host syncs left per training step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_loop.py"


def test_the_loop_is_timed_against_the_bare_step(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--steps", "3", "--warmup", "1",
         "--repeats", "1", "--logger", "csv", "--threads", "1", "--out",
         str(tmp_path / "loop.json"), "sampler.meta_batch_size=2", "backbone.hidden=8",
         "sampler.val_episodes=2"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "loop.json").read_text())
    assert report["bare_steps_s"] > 0 and report["loop_steps_s"] > 0
    # the clock timed exactly the steps after warm-up, and the validation apart from them
    assert [r["timed_steps"] for r in report["runs"]["loop"]] == [3]
    assert all(r["val_s"] > 0 and r["loop_fit_s"] > r["val_s"] for r in report["runs"]["loop"])
    assert report["experiment"] == "omniglot_maml_5w1s" and report["steps"] == 3
    # the default sharebone-train loop on a CPU: the NaN check reads every step (free there),
    # the bar on the logging step (the epoch's last); nothing else reads
    lines = report["host_sync_lines"]
    assert {line.split(":")[0] for line in lines} == {"sharebone/callbacks/guards.py",
                                                      "sharebone/callbacks/progress.py"}, lines
    assert [n for line, n in lines.items() if "guards.py" in line] == [1.0]
    assert "sharebone-train" in out.stdout and "ratio" in out.stdout
