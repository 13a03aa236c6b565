"""Parameters each adapter kind adds, and its forward time on CPU relative to the plain backbone.

conv4-64 (3x84x84) and ResNet-12 at its default widths (64-160-320-640, 84x84), eval mode, no
gradients; the ratio is the median over ``--repeats`` of (adapted time / plain time), the two
timed alternately. Usage: ``python scripts/bench_adapters.py [--batch 8] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from sharebone.models import count_parameters, create_backbone
from sharebone.models.adapters import inject_adapters

BACKBONES = {"conv4-64": {"name": "conv4", "in_channels": 3, "hidden": 64, "image_size": 84},
             "resnet12": {"name": "resnet12", "in_channels": 3, "image_size": 84}}
KINDS = {"film": {}, "residual": {}, "lora r=4": {"rank": 4}}


def seconds(net: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    net(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"| backbone | kind | backbone params | added | added % | forward ratio "
          f"(median of {args.repeats}, batch {args.batch}, {torch.get_num_threads()} threads) |")
    print("|---|---|---:|---:|---:|---:|")
    for label, spec in BACKBONES.items():
        spec = dict(spec)
        plain = create_backbone(spec.pop("name"), **spec).eval()
        x = torch.randn(args.batch, 3, 84, 84)
        base = count_parameters(plain)
        for kind, options in KINDS.items():
            net = copy.deepcopy(plain)
            names = inject_adapters(net, kind.split()[0], **options)
            params = dict(net.named_parameters())
            added = sum(params[n].numel() for n in names)
            ratios = []
            with torch.no_grad():
                seconds(plain, x), seconds(net, x)  # warm-up
                for _ in range(args.repeats):
                    ratios.append(seconds(net, x) / seconds(plain, x))
            print(f"| {label} | {kind} | {base:,} | {added:,} | {100 * added / base:.2f} | "
                  f"{statistics.median(ratios):.2f} |", flush=True)


if __name__ == "__main__":
    main()
