"""DDP scaling on CPU: meta-training tasks per second with 1 process vs 2 (trainer=ddp_cpu).

Each configuration is a real ``sharebone-train`` run in a fresh process (synthetic 28x28
images, conv4, 5-way 1-shot, 5 queries per class); a callback times the optimizer steps
after a warm-up, on rank 0, so process start-up, validation and the test are not counted.
Tasks/s counts the whole meta-batch (all ranks together).

    .venv/bin/python scripts/bench_ddp.py                     # protonet and maml, 1 vs 2
    .venv/bin/python scripts/bench_ddp.py --regimes protonet --steps 40 --json out.json

With 1 process torch uses every core for each operation (intra-op threads); with N
processes Lightning gives each cores/N threads. On a machine with 2 cores the comparison is
"2 threads in one process" against "2 processes of 1 thread".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl

HERE = Path(__file__).resolve().parent


class StepTimer(pl.Callback):
    """Wall time of optimizer steps ``warmup .. end`` on rank 0, written to ``path``."""

    def __init__(self, path: str, warmup: int = 5) -> None:
        self.path, self.warmup = path, warmup
        self.started: float | None = None
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.started is None:
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.started is not None:
            self.steps += 1
            self.elapsed = time.perf_counter() - self.started

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0 and self.started is not None:
            Path(self.path).write_text(json.dumps({"steps": self.steps, "seconds": self.elapsed,
                                                   "world_size": trainer.world_size}))


def bench(regime: str, processes: int, steps: int, warmup: int, meta_batch: int,
          workdir: Path, threads: int | None = None) -> dict:
    """One run; ``threads`` fixes torch's threads per process (default: cores / processes)."""
    out = workdir / f"{regime}_{processes}_{threads}.json"
    trainer = ["trainer=cpu"] if processes == 1 else ["trainer=ddp_cpu",
                                                      f"trainer.devices={processes}"]
    cmd = [sys.executable, "-m", "sharebone", "train", "task=synthetic_images", "logger=none",
           f"regime={regime}", *trainer, "trainer.max_epochs=1", "trainer.limit_val_batches=0",
           "trainer.enable_progress_bar=false",
           f"sampler.meta_batch_size={meta_batch}", f"sampler.batches_per_epoch={steps + warmup}",
           "checkpoint.every_n_train_steps=0", "test.episodes=2",
           "test.settings=[{n_way: 5, k_shot: 1}]", f"hydra.run.dir={workdir / out.stem}",
           f"+callbacks.timer._target_={Path(__file__).stem}.StepTimer",
           f"+callbacks.timer.path={out}", f"+callbacks.timer.warmup={warmup}"]
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "disabled"}
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{regime} x{processes} failed:\n{done.stdout[-2000:]}\n"
                           f"{done.stderr[-3000:]}")
    timing = json.loads(out.read_text())
    tasks = timing["steps"] * meta_batch
    return {"regime": regime, "processes": processes,
            "threads": threads or max(1, (os.cpu_count() or 1) // processes),
            "meta_batch_size": meta_batch,
            "steps": timing["steps"], "seconds": round(timing["seconds"], 3),
            "tasks_per_s": round(tasks / timing["seconds"], 2)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regimes", nargs="+", default=["protonet", "maml"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--also-single-thread", action="store_true",
                        help="also time 1 process with 1 thread (torch's threads oversubscribe "
                             "a busy machine)")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(n, None) for n in args.processes]
        if args.also_single_thread:
            runs.insert(1, (1, 1))
        for regime in args.regimes:
            for n, threads in runs:
                r = bench(regime, n, args.steps, args.warmup, args.meta_batch, Path(tmp), threads)
                results.append(r)
                print(f"{regime:9s} {n} proc x {r['threads']} threads: {r['tasks_per_s']:8.2f} "
                      f"tasks/s "
                      f"({r['steps']} steps of {args.meta_batch} tasks in {r['seconds']:.2f} s)",
                      flush=True)
    print("\n| regime | processes | threads each | tasks/s | vs first row |\n|---|---|---|---|---|")
    for r in results:
        base = next(b for b in results if b["regime"] == r["regime"])
        print(f"| {r['regime']} | {r['processes']} | {r['threads']} | {r['tasks_per_s']:.2f} | "
              f"{r['tasks_per_s'] / base['tasks_per_s']:.2f}x |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{os.cpu_count()} CPU cores, load average {load:.1f} at the end: on a shared "
          "machine, compare rows of one run only.")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
