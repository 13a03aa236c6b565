"""Peak memory and time of the few-shot test at each ``test.batch_size`` (episodes per forward).

Issue 13: ``test.batch_size: 32`` took 6.2 GB of RSS against 1.8 GB at 4, at the same speed on
a CPU. This script measures it: for each regime and batch size, a fresh subprocess builds the
regime (an untrained conv4: time and memory do not depend on the weights) on generated 28x28
images (Omniglot's size), scores ``--episodes`` test episodes of one setting (default 20-way
5-shot, 15 queries: the largest of the default test settings) exactly as ``sharebone-eval``
does (``evaluate``, freed memory kept in the process), and reports

- ``peak_rss_mb``: the kernel's peak-RSS mark of the process (``ru_maxrss``), all of it;
- ``setup_rss_mb``: the same mark before scoring (imports, model, test classes);
- ``seconds``, ``cpu_seconds`` (user + system time of the process) and ``episodes_per_s`` of
  the scoring alone. On a shared machine wall time swings with the other processes; CPU time
  much less, so ``--threads 1`` (the default) with CPU time is the fair comparison there.

    python scripts/bench_test_batch.py                             # 600 episodes, CPU
    python scripts/bench_test_batch.py --regimes maml --sizes 1,4,32 --episodes 96
    python scripts/bench_test_batch.py --device cuda --sizes 4,32,128 --out gpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(regime: str, batch_size: int, episodes: int, n_way: int, k_shot: int,
            q_query: int, device: str, threads: int = 0) -> dict[str, Any]:
    """One measurement, in this process (run it in a fresh one: ``ru_maxrss`` only grows)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    from sharebone.config import compose_config
    from sharebone.evaluation.fewshot import evaluate
    from sharebone.memory import keep_freed_memory
    from sharebone.run.build import build_run

    keep_freed_memory()  # as sharebone-eval and sharebone-train do
    cfg = compose_config(
        ["task=synthetic_images", "logger=none", f"regime={regime}",
         "task.family.images_per_class=" + str(max(20, k_shot + q_query)),
         f"test.settings=[{{n_way: {n_way}, k_shot: {k_shot}}}]", f"test.q_query={q_query}",
         f"test.episodes={episodes}", f"test.batch_size={batch_size}"],
        REPO_ROOT / "outputs" / "bench_test_batch", root_dir=REPO_ROOT)
    torch.manual_seed(0)  # the same untrained weights at every batch size: the same scores
    parts = build_run(cfg)
    model = parts.regime.to(device)
    setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    result = evaluate(model, parts.tests, episodes=episodes, episodes_per_batch=batch_size)[0]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    row = {"regime": regime, "batch_size": batch_size, "episodes": episodes,
           "setting": f"{n_way}w{k_shot}s{q_query}q", "device": device,
           "threads": torch.get_num_threads(), "seconds": round(seconds, 2),
           "cpu_seconds": round(cpu, 2),
           "episodes_per_s": round(episodes / seconds, 2),
           "setup_rss_mb": round(setup_rss),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "acc": round(result.mean, 4)}
    if device.startswith("cuda"):
        row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return row


def in_subprocess(args: argparse.Namespace, regime: str, batch_size: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--one", "--regimes", regime, "--sizes",
               str(batch_size), "--episodes", str(args.episodes), "--n-way", str(args.n_way),
               "--k-shot", str(args.k_shot), "--q-query", str(args.q_query), "--device",
               args.device, "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{regime} at batch size {batch_size} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    head = ["regime", "batch_size", "episodes", "seconds", "CPU s", "episodes/s", "setup RSS MB",
            "peak RSS MB"] + (["peak CUDA MB"] if any("peak_cuda_mb" in r for r in rows) else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["regime"], r["batch_size"], r["episodes"], f"{r['seconds']:.1f}",
                 f"{r['cpu_seconds']:.1f}",
                 f"{r['episodes_per_s']:.2f}", r["setup_rss_mb"], r["peak_rss_mb"]]
        if "peak_cuda_mb" in r:
            cells.append(r["peak_cuda_mb"])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--regimes", default="protonet,maml")
    p.add_argument("--sizes", default="1,4,8,16,32", help="test batch sizes to measure")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--n-way", type=int, default=20)
    p.add_argument("--k-shot", type=int, default=5)
    p.add_argument("--q-query", type=int, default=15)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default); 1 keeps a shared machine fair")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    regimes = args.regimes.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.one:
        print(json.dumps(measure(regimes[0], sizes[0], args.episodes, args.n_way, args.k_shot,
                                 args.q_query, args.device, args.threads)))
        return []
    rows = []
    for regime in regimes:
        for size in sizes:
            rows.append(in_subprocess(args, regime, size))
            print(json.dumps(rows[-1]), flush=True)
    print("\n" + table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
