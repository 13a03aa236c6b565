"""ProtoNet training-step time per backbone, on CPU, at miniImageNet's image size.

Setting: 5-way 5-shot 15-query episodes of 84x84 RGB images (100 images per episode, random
pixels: the time does not depend on them), meta-batch 1, one optimizer step as Lightning takes
it (``episode_loss``, ``backward``, Adam), after ``--warmup`` steps; the median and the range
of ``--iters`` timed steps. One thread by default (``--threads``), and freed memory kept in the
process as ``sharebone-train`` does (``keep_freed_memory``). The machine's load average is
printed before and after: on a shared machine, compare rows of one run only.

    python scripts/bench_backbones.py                          # conv4 (32, 64), resnet12, timm
    python scripts/bench_backbones.py --backbones resnet12-dropblock --iters 3 --out bench.json
    python scripts/bench_backbones.py --backbones conv4-64 resnet12 wrn28_10 --k-shot 1 \
        --q-query 1 --warmup 1 --iters 2                      # 10 images per episode

``wrn28_10`` is heavy on a CPU: its first group runs at the full 84x84 with 160 channels, 4
blocks, on every image; about 72 GFLOP per image forward (36 G multiply-adds, a third in each
group), so a 5-way 5-shot 15-query step (100 images, forward and backward) is about 21 TFLOP,
and backward keeps about 150 MB of activations per image (15 GB for the step). Both scale
with the images per episode, so ``--k-shot 1 --q-query 1`` (10 images) measures it at a tenth
of the time and memory. The peak resident memory of the process so far is printed per row.
On a shared 2-core machine (load average about 10, 1 thread), 10 images per episode:
conv4-64 0.28 s per step, resnet12 5.9 s, wrn28_10 72 s (62-82 s; peak RSS 3.1 GB, 1.6 GB
before it); 20 images: wrn28_10 128 s (one step, peak RSS 3.7 GB); 100 images: conv4-64
6.0 s, resnet12 75 s (12.8x its 10-image time). A 100-image wrn28_10 step is then 11-15
minutes and about 15 GB, which this machine (23 GB, shared) cannot give it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

N_WAY, K_SHOT, Q_QUERY, SIDE = 5, 5, 15, 84
#: name -> backbone spec (84x84 RGB).
BACKBONES = {
    "conv4-32": {"name": "conv4", "in_channels": 3, "hidden": 32, "image_size": SIDE},
    "conv4-64": {"name": "conv4", "in_channels": 3, "hidden": 64, "image_size": SIDE},
    "resnet12": {"name": "resnet12", "in_channels": 3, "image_size": SIDE},
    "resnet12-dropblock": {"name": "resnet12", "in_channels": 3, "image_size": SIDE,
                           "drop_block": True},
    "wrn28_10": {"name": "wrn28_10", "in_channels": 3, "image_size": SIDE},
    "timm:resnet18": {"name": "timm:resnet18", "in_channels": 3, "image_size": SIDE},
}
DEFAULT = ["conv4-32", "conv4-64", "resnet12", "timm:resnet18"]


def episode(n_way: int = N_WAY, k_shot: int = K_SHOT, q_query: int = Q_QUERY):
    from sharebone.data.episodes import EpisodeSampler

    per_class = max(20, k_shot + q_query)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_way * per_class, 3, SIDE, SIDE), generator=g,
                           dtype=torch.uint8)
    sampler = EpisodeSampler(images, torch.arange(n_way * per_class) // per_class, n_way,
                             k_shot, q_query)
    return sampler.batch([0]).to_float()


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux: ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(spec: dict, warmup: int, iters: int, shape: tuple[int, int, int] = (N_WAY, K_SHOT,
                                                                               Q_QUERY)) -> dict:
    from sharebone.models import count_parameters
    from sharebone.regimes import ProtoNet

    torch.manual_seed(0)
    model = ProtoNet(spec).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = episode(*shape)
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss, _ = model.episode_loss(batch)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    assert torch.isfinite(loss)
    return {"params": count_parameters(model.backbone),
            "num_features": model.backbone.num_features,
            "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "steps": len(times), "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=DEFAULT, choices=list(BACKBONES))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-way", type=int, default=N_WAY)
    parser.add_argument("--k-shot", type=int, default=K_SHOT)
    parser.add_argument("--q-query", type=int, default=Q_QUERY)
    parser.add_argument("--out", help="also write the rows to this JSON file")
    args = parser.parse_args()

    from sharebone.memory import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{args.threads} thread(s), torch {torch.__version__}")
    shape = (args.n_way, args.k_shot, args.q_query)
    images = args.n_way * (args.k_shot + args.q_query)
    print(f"ProtoNet {args.n_way}-way {args.k_shot}-shot {args.q_query}-query ({images} images),"
          f" {SIDE}x{SIDE}x3, meta-batch 1; {machine}")
    print(f"load average before: {os.getloadavg()}")
    rows = []
    print("| backbone | parameters | features | step (s), median | min | max | peak RSS so far |")
    print("|---|---|---|---|---|---|---|")
    for name in args.backbones:
        row = {"backbone": name, "images": images,
               **bench(BACKBONES[name], args.warmup, args.iters, shape)}
        rows.append(row)
        print(f"| {name} | {row['params']:,} | {row['num_features']} | {row['median_s']:.3f} | "
              f"{row['min_s']:.3f} | {row['max_s']:.3f} | {row['peak_rss_mb']:,.0f} MB |",
              flush=True)
    print(f"load average after: {os.getloadavg()} (a shared machine: other jobs add noise)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "warmup": args.warmup, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
