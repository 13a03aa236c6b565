"""Peak memory of one Meta-Dataset episode at its largest, per regime, and what brings it down.

    python scripts/md_episode_memory.py                  # conv4, 84x84x3, the paper's limits
    python scripts/md_episode_memory.py --regimes maml_zero_head --settings 500:84,250:84,500:42

The largest episode Meta-Dataset's rules allow (``sampler.meta_dataset``): 50 ways, 500
support images (10 a way) and 10 queries a way (500), at 84x84x3. For each regime, built from
its real config (``backbone=conv4``): the peak tensor memory
(:class:`sharebone.memory.PeakMemory`, the allocator's bytes, as a GPU would count them) of

- a **training step** on it (loss and backward; ProtoNet, MAML with a zero-init head, R2D2);
- **scoring** it (the query predictions: MAML's ``test_inner_steps``, R2D2's ridge solve,
  the support-set head fit of pre-training / fine-tuning);

and, with ``--settings``, the same at the settings that cut it (a smaller support cap, a
smaller image), so a user can read off what to set. (Minutes on a CPU: every step is a
50-way episode of 1,000 images at 84 px, measured under the profiler.) One meta-batch of such
episodes costs ``meta_batch_size`` times this (MAML looped on a CPU frees each task's graph;
vmapped, a chunk's: ``vmap_chunk_size``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sharebone.config import compose_config
from sharebone.data.episodes import RaggedEpisodes
from sharebone.memory import PeakMemory
from sharebone.run.build import build_run

REPO = Path(__file__).resolve().parents[1]
#: Regime label -> its overrides (MAML needs a head sized per episode: zero-init).
REGIMES = {"protonet": ["regime=protonet"],
           "maml_zero_head": ["regime=maml", "regime.head=zero"],
           "r2d2": ["regime=r2d2"],
           "pretrain_head_fit": ["regime=pretrain"]}
TRAINS_ON_EPISODES = {"protonet", "maml_zero_head", "r2d2"}


def largest_episode(ways: int, support: int, queries_per_way: int, size: int
                    ) -> RaggedEpisodes:
    gen = torch.Generator().manual_seed(0)
    shots = support // ways
    return RaggedEpisodes(
        support=torch.rand(ways * shots, 3, size, size, generator=gen),
        support_labels=torch.arange(ways).repeat_interleave(shots),
        query=torch.rand(ways * queries_per_way, 3, size, size, generator=gen),
        query_labels=torch.arange(ways).repeat_interleave(queries_per_way),
        classes=torch.arange(ways), ways=torch.tensor([ways]),
        support_sizes=torch.tensor([ways * shots]),
        query_sizes=torch.tensor([ways * queries_per_way]))


def regime_for(label: str, backbone: str, size: int, tmp: Path):
    overrides = ["task=synthetic_images_rgb84", f"task.image_size={size}",
                 f"backbone={backbone}", "logger=none", "sampler.train.shape=meta_dataset",
                 "test.settings=[{shape: meta_dataset}]", *REGIMES[label]]
    cfg = compose_config(overrides, tmp, config_name="train", root_dir=REPO)
    return build_run(cfg).regime


def measure(regime, episode: RaggedEpisodes, train: bool) -> tuple[int, float]:
    start = time.perf_counter()
    with PeakMemory("cpu") as peak:
        if train:
            regime.zero_grad(set_to_none=True)
            loss, _ = regime.loss_and_scores(episode)
            loss.backward()
        else:
            with regime.prediction_context():
                regime.task_predictions(episode)
    return peak.bytes, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="conv4")
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--settings", default="500:84",
                        help="max_support_set_size:image_size pairs (the paper's: 500:84), "
                             "e.g. 500:84,250:84,500:42")
    parser.add_argument("--tmp", default="/tmp/sharebone_md_memory")
    args = parser.parse_args()
    torch.manual_seed(0)
    settings = [tuple(int(v) for v in s.split(":")) for s in args.settings.split(",")]
    print("| regime | support cap | image | step | peak MiB | seconds |")
    print("|---|---:|---:|---|---:|---:|")
    for label in args.regimes.split(","):
        for support, size in settings:
            regime = regime_for(label, args.backbone, size, Path(args.tmp))
            episode = largest_episode(50, support, 10, size)
            steps = (["train", "score"] if label in TRAINS_ON_EPISODES else ["score"])
            for step in steps:
                peak, seconds = measure(regime, episode, step == "train")
                print(f"| {label} | {support} | {size} | {step} | {peak / 2**20:,.0f} | "
                      f"{seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
