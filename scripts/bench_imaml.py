"""iMAML against MAML: peak memory and time per meta-batch as inner_steps grows.

Setting (Finn et al. 2017 / Rajeswaran et al. 2019, Omniglot): conv4 with 64 channels, 5-way
1-shot 15-query episodes of 28x28 images, meta-batch ``--meta-batch`` (4), inner lr 0.4.
``maml`` is sharebone's second-order MAML as ``sharebone-train`` runs it (on a CPU: tasks
looped, each task's meta-gradient taken as soon as it is done, so memory is one task's graph,
through every inner step); ``imaml`` is iMAML (lam 2, ``--cg-steps`` CG steps, damping 1), whose
inner steps keep no graph. Both run the same episodes (random uint8 images, or the real
Omniglot-small train split with ``--data real``) at inner_steps ``--steps`` (1, 5, 10, 20).

Per configuration: ``--warmup`` meta-batches, then ``--iters`` timed ones (``episode_loss`` and
its ``backward``, as Lightning's step; the optimizer step is left out, it is the same for
both), then one more under :class:`sharebone.memory.PeakMemory`: the peak tensor memory above
the start (on CUDA ``max_memory_allocated``, on a CPU the profiler's allocation records,
what a GPU's allocator would count). ``growth`` is each peak over the same method's peak at
the first step count. Writes a Markdown table to stdout and JSON to ``--out``::

    python scripts/bench_imaml.py                                   # CPU, minutes
    python scripts/bench_imaml.py --device cuda --iters 10 --meta-batch 32
    python scripts/bench_imaml.py --hidden 4 --steps 1,2 --iters 1 --warmup 0   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

N_WAY, K_SHOT, Q_QUERY, INNER_LR = 5, 1, 15, 0.4


def episodes(args: argparse.Namespace, batches: int):
    """``batches`` float meta-batches on ``args.device``."""
    from sharebone.data.episodes import EpisodeSampler

    if args.data == "real":
        from sharebone.data.tasks import OmniglotTasks

        splits = {"train": {"archives": ["images_background_small1", "images_background_small2"],
                            "alphabets": ["Balinese", "Greek", "Latin", "Japanese_(katakana)"],
                            "rotations": [0, 90, 180, 270]}}
        sampler = OmniglotTasks(splits, download=False).sampler("train", N_WAY, K_SHOT, Q_QUERY,
                                                                0)
    else:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (2000, 1, 28, 28), generator=g, dtype=torch.uint8)
        sampler = EpisodeSampler(images, torch.arange(2000) // 20, N_WAY, K_SHOT, Q_QUERY)
    size = args.meta_batch
    return [sampler.batch(range(b * size, (b + 1) * size)).to(args.device).to_float()
            for b in range(batches)]


def build(impl: str, steps: int, args: argparse.Namespace):
    from sharebone.regimes import IMAML, MAML

    torch.manual_seed(0)
    spec = {"name": "conv4", "in_channels": 1, "hidden": args.hidden, "image_size": 28}
    if impl == "maml":
        model = MAML(spec, n_way=N_WAY, inner_steps=steps, inner_lr=INNER_LR)
    else:
        model = IMAML(spec, n_way=N_WAY, inner_steps=steps, inner_lr=INNER_LR, lam=2.0,
                      cg_steps=args.cg_steps, cg_damping=1.0)
    return model.to(args.device).train()


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(impl: str, steps: int, args: argparse.Namespace, data) -> dict:
    from sharebone.memory import PeakMemory

    model = build(impl, steps, args)

    def step(episode) -> None:
        model.zero_grad(set_to_none=True)
        loss, _ = model.episode_loss(episode)
        loss.backward()

    for i in range(args.warmup):
        step(data[i % len(data)])
    synchronize(args.device)
    start = time.perf_counter()
    for i in range(args.iters):
        step(data[(args.warmup + i) % len(data)])
    synchronize(args.device)
    seconds = (time.perf_counter() - start) / max(args.iters, 1)
    model.zero_grad(set_to_none=True)
    with PeakMemory(args.device) as peak:
        step(data[0])
    return {"impl": impl, "inner_steps": steps, "seconds_per_meta_batch": seconds,
            "peak_mb": peak.bytes / 2**20}


def table(rows: list[dict]) -> str:
    first = {}
    for r in rows:
        first.setdefault(r["impl"], r["peak_mb"])
    lines = ["| method | inner_steps | peak memory (MiB) | growth | s / meta-batch |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['inner_steps']} | {r['peak_mb']:.1f} | "
                     f"{r['peak_mb'] / first[r['impl']]:.2f}x | "
                     f"{r['seconds_per_meta_batch']:.3f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", default="1,5,10,20", help="inner_steps to measure")
    p.add_argument("--impls", default="maml,imaml")
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64, help="conv4 channels (64: the paper's)")
    p.add_argument("--cg-steps", type=int, default=5)
    p.add_argument("--iters", type=int, default=3, help="timed meta-batches")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", choices=["random", "real"], default="random")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="JSON results")
    args = p.parse_args(argv)
    args.steps = [int(s) for s in args.steps.split(",")]
    args.impls = args.impls.split(",")
    unknown = set(args.impls) - {"maml", "imaml"}
    if unknown:
        p.error(f"--impls: unknown {sorted(unknown)}; known: maml, imaml")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = episodes(args, max(args.warmup + args.iters, 1))
    print(f"conv4-{args.hidden} 28x28x1, {N_WAY}-way {K_SHOT}-shot {Q_QUERY}-query, meta-batch "
          f"{args.meta_batch}, {args.device} ({torch.get_num_threads()} threads), "
          f"{args.iters} timed meta-batches after {args.warmup}; iMAML: lam 2, "
          f"{args.cg_steps} CG steps", flush=True)
    rows = []
    for impl in args.impls:
        for steps in args.steps:
            rows.append(measure(impl, steps, args, data))
            print(f"  {impl} inner_steps={steps}: {rows[-1]['peak_mb']:.1f} MiB, "
                  f"{rows[-1]['seconds_per_meta_batch']:.3f} s", flush=True)
    print("\n" + table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": args.device, "meta_batch": args.meta_batch,
                       "hidden": args.hidden, "cg_steps": args.cg_steps,
                       "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                       "results": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
