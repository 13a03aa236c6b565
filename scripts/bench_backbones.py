"""ProtoNet training-step time per backbone, on CPU, at miniImageNet's image size.

Setting: 5-way 5-shot 15-query episodes of 84x84 RGB images (100 images per episode, random
pixels: the time does not depend on them), meta-batch 1, one optimizer step as Lightning takes
it (``episode_loss``, ``backward``, Adam), after ``--warmup`` steps; the median and the range
of ``--iters`` timed steps. One thread by default (``--threads``), and freed memory kept in the
process as ``sharebone-train`` does (``keep_freed_memory``). The machine's load average is
printed before and after: on a shared machine, compare rows of one run only.

    python scripts/bench_backbones.py                          # conv4 (32, 64), resnet12, timm
    python scripts/bench_backbones.py --backbones resnet12-dropblock --iters 3 --out bench.json

``wrn28_10`` is offered but heavy here: its first group runs at the full 84x84 with 160
channels on all 100 images; on a shared 2-core, 23 GB machine the process was killed after
about 4 minutes, before its first step ended (presumably out of memory).
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


def episode():
    from sharebone.data.episodes import EpisodeSampler

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N_WAY * 20, 3, SIDE, SIDE), generator=g, dtype=torch.uint8)
    sampler = EpisodeSampler(images, torch.arange(N_WAY * 20) // 20, N_WAY, K_SHOT, Q_QUERY)
    return sampler.batch([0]).to_float()


def bench(spec: dict, warmup: int, iters: int) -> dict:
    from sharebone.models import count_parameters
    from sharebone.regimes import ProtoNet

    torch.manual_seed(0)
    model = ProtoNet(spec).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = episode()
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
            "steps": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=DEFAULT, choices=list(BACKBONES))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the rows to this JSON file")
    args = parser.parse_args()

    from sharebone.memory import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{args.threads} thread(s), torch {torch.__version__}")
    print(f"ProtoNet {N_WAY}-way {K_SHOT}-shot {Q_QUERY}-query, {SIDE}x{SIDE}x3, meta-batch 1; "
          f"{machine}")
    print(f"load average before: {os.getloadavg()}")
    rows = []
    print("| backbone | parameters | features | step (s), median | min | max |")
    print("|---|---|---|---|---|---|")
    for name in args.backbones:
        row = {"backbone": name, **bench(BACKBONES[name], args.warmup, args.iters)}
        rows.append(row)
        print(f"| {name} | {row['params']:,} | {row['num_features']} | {row['median_s']:.3f} | "
              f"{row['min_s']:.3f} | {row['max_s']:.3f} |", flush=True)
    print(f"load average after: {os.getloadavg()} (a shared machine: other jobs add noise)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "warmup": args.warmup, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
