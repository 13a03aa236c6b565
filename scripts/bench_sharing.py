"""What adapting a subset saves: MAML's meta-training step (inner loop + outer backward) under
each sharing preset, time and peak memory relative to adapting everything (``all``).

    python scripts/bench_sharing.py                      # conv4 (1x28x28) and resnet12 (3x84x84)
    python scripts/bench_sharing.py --backbones conv4 --presets all,head,norm --repeats 5
    python scripts/bench_sharing.py --backbones resnet12 --image-size 32 --tasks 2   # minutes

Per backbone and preset: one MAML model (second order, ``inner_steps`` steps, vmap off: tasks
looped, as on a CPU by default), the same meta-batch of 5-way 1-shot 5-query episodes for
every preset (``--image-size`` shrinks the images, ``--ways`` the episodes, for a quick
CPU run). Time: the median over ``--repeats`` of one step's seconds divided by ``all``'s,
the presets timed round-robin so that the machine's load falls on all of them alike. Memory:
:class:`sharebone.memory.PeakMemory` of one step of its own (tensor bytes the allocator handed
out). A ratio below 1: the subset is cheaper than adapting everything.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from sharebone.config import CONFIG_DIR
from sharebone.data.episodes import EpisodeSampler
from sharebone.memory import PeakMemory
from sharebone.regimes import MAML

BACKBONES = {"conv4": ({"name": "conv4", "in_channels": 1, "image_size": 28}, (1, 28, 28)),
             "resnet12": ({"name": "resnet12", "in_channels": 3, "image_size": 84},
                          (3, 84, 84))}
PRESETS = ["all", "head", "norm", "bias", "film", "last_block"]


def preset(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "sharing" / f"{name}.yaml"))


def step(model: MAML, episode) -> None:
    model.zero_grad(set_to_none=True)
    loss, _ = model.episode_loss(episode)
    loss.backward()


def seconds(model: MAML, episode) -> float:
    start = time.perf_counter()
    step(model, episode)
    return time.perf_counter() - start


def episode_batch(shape: tuple[int, ...], ways: int, tasks: int, queries: int = 5):
    """The same meta-batch of ``ways``-way 1-shot episodes for every preset."""
    gen = torch.Generator().manual_seed(0)
    per_class = 1 + queries
    classes = max(ways, 10)
    images = torch.rand(classes * per_class, *shape, generator=gen)
    labels = torch.arange(classes * per_class) // per_class
    return EpisodeSampler(images, labels, ways, 1, queries).batch(list(range(tasks)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="conv4,resnet12")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--tasks", type=int, default=4, help="episodes per meta-batch")
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ways", type=int, default=5, help="ways of the 1-shot episodes")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image side for every backbone (default: conv4 28, resnet12 84)")
    args = parser.parse_args()
    presets = args.presets.split(",")
    if presets[0] != "all":
        presets = ["all", *[p for p in presets if p != "all"]]
    print(f"{args.ways}-way 1-shot 5-query, {args.tasks} tasks per meta-batch, "
          f"{args.inner_steps} inner step(s)\n")
    print(f"| backbone | preset | adapted params | step time / all (median of {args.repeats}) "
          f"| peak memory (MiB) | memory / all |")
    print("|---|---|---:|---:|---:|---:|")
    for label in args.backbones.split(","):
        spec, shape = BACKBONES[label]
        if args.image_size:
            spec, shape = {**spec, "image_size": args.image_size}, (
                shape[0], args.image_size, args.image_size)
        episode = episode_batch(shape, args.ways, args.tasks)
        models = {}
        for name in presets:
            torch.manual_seed(0)
            models[name] = MAML(spec, n_way=args.ways, inner_steps=args.inner_steps, vmap=False,
                                sharing=preset(name))
        for model in models.values():
            step(model, episode)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in presets}
        for _ in range(args.repeats):
            for name, model in models.items():
                times[name].append(seconds(model, episode))
        memory = {}
        for name, model in models.items():
            with PeakMemory() as peak:
                step(model, episode)
            memory[name] = peak.bytes
        base_time = statistics.median(times["all"])
        for name, model in models.items():
            adapted = model.sharing_counts().roles["adapt"]
            ratio = statistics.median(times[name]) / base_time
            print(f"| {label} {shape[-1]}px | {name} | {adapted:,} | {ratio:.2f} | "
                  f"{memory[name] / 2**20:.1f} | {memory[name] / memory['all']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
