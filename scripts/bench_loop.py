"""What the training loop costs: ``sharebone-train`` against the bare step, same process.

The bare step is what a hand-written loop does with the very same parts (the regime, its
optimizer, the run's sampler and data placement): draw a meta-batch, move and prepare it,
``episode_loss``, ``backward``, the run's gradient clipping, ``optimizer.step``. The loop is
``sharebone.run.train.run`` on the same composed config, as ``sharebone-train`` runs it: a real
Lightning Trainer with the run's callbacks (checkpoints, progress, LR monitor, the NaN guard,
step times), its loggers and its validation.

Reported per run (median over ``--repeats``, the two alternating; ``ratio`` is the median of
each repeat's own ratio):

- ``bare_steps_s``, ``loop_steps_s``: meta-batches per second over the timed training steps
  (after ``--warmup``; ``*_tasks_s``: times the meta-batch size); ``ratio``: loop / bare
  (the issue's goal: >= 0.9 on a GPU);
- ``loop_fit_s``: the whole ``trainer.fit`` (sanity check, validation, checkpoints included),
  and ``val_s``, the epoch-end validation alone;
- ``host_syncs_per_step``: host reads of device values per training step (an untimed pass
  with :class:`sharebone.callbacks.syncs.HostSyncs`), with the lines that make them. On a GPU each
  one
  makes the host wait until the device has caught up.

Timed regions are bracketed by ``torch.cuda.synchronize`` on CUDA (twice per run, never per
step). Any Hydra override of ``sharebone-train`` can follow the options::

    python scripts/bench_loop.py                               # conv4 MAML 5w1s, meta-batch 32
    python scripts/bench_loop.py --device cuda --out loop.json
    python scripts/bench_loop.py --steps 30 sampler.meta_batch_size=4 --threads 1
    python scripts/bench_loop.py --experiment omniglot_protonet_5w1s --steps 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, open_dict

from sharebone.callbacks.syncs import HostSyncs, synchronize
from sharebone.config import compose_config
from sharebone.data.placement import place_source
from sharebone.data.tasks import prepare_episode
from sharebone.memory import keep_freed_memory
from sharebone.run.build import build_run
from sharebone.run.environment import choose_threads, set_float32_matmul_precision
from sharebone.run.train import run

#: What the clock callback measured in the last ``run``, and the sync counter it made.
CLOCK: dict[str, float] = {}
SYNCS: list[HostSyncs] = []


class StepClock(pl.Callback):
    """Times training steps ``warmup..`` up to the epoch-end validation, and the validation."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.steps = 0
        CLOCK.clear()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            synchronize(pl_module.device)
            CLOCK["train_start"] = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if "train_start" in CLOCK:
            self.steps += 1

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or "train_end" in CLOCK or "train_start" not in CLOCK:
            return
        synchronize(pl_module.device)
        CLOCK["train_end"] = time.perf_counter()
        CLOCK["steps"] = self.steps

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "train_end" in CLOCK and "val_end" not in CLOCK:
            synchronize(pl_module.device)
            CLOCK["val_end"] = time.perf_counter()


class CountedSyncs(HostSyncs):
    """:class:`HostSyncs` that this script finds again after the run."""

    def __init__(self) -> None:
        super().__init__()
        SYNCS.append(self)


def compose(args: argparse.Namespace, out: Path, extra: list[str] = ()) -> DictConfig:
    overrides = [f"experiment={args.experiment}", f"task={args.task}",
                 f"logger={args.logger}", "trainer.max_epochs=1",
                 f"sampler.batches_per_epoch={args.warmup + args.steps}",
                 "test.enabled=false", "figures.enabled=false", f"threads={args.threads}",
                 *(["trainer=gpu"] if args.device == "cuda" else ["trainer.accelerator=cpu"]),
                 *args.overrides, *extra]
    return compose_config(overrides, out)


def bare_steps_per_second(cfg: DictConfig, args: argparse.Namespace) -> float:
    """The run's step by hand: no Trainer, no callbacks, no logging."""
    pl.seed_everything(cfg.seed)
    parts = build_run(cfg)
    device = torch.device(args.device)
    model = parts.regime.to(device)
    choose_threads(cfg.get("threads", "auto"), model)  # as train.run does
    data = parts.datamodule
    source = data.source("train")
    if device.type != "cpu":
        source = place_source(source, device, data.images_on_device, data.num_workers)
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    clip = cfg.trainer.get("gradient_clip_val")
    size = data.meta_batch_size
    model.train()
    start = 0.0
    for b in range(args.warmup + args.steps):
        if b == args.warmup:
            synchronize(device)
            start = time.perf_counter()
        episode = source.batch(torch.arange(b * size, (b + 1) * size))
        episode = prepare_episode(source, episode.to(device, non_blocking=True))
        loss, _ = model.episode_loss(episode)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return args.steps / (time.perf_counter() - start)


def loop_run(cfg: DictConfig, warmup: int) -> dict[str, float]:
    """``sharebone.run.train.run`` with :class:`StepClock` added: steps/s, fit and validation
    time."""
    with open_dict(cfg):
        cfg.callbacks["bench_clock"] = {"_target_": "__main__.StepClock", "warmup": warmup}
    started = time.perf_counter()
    run(cfg)
    fit = time.perf_counter() - started
    if "train_end" not in CLOCK:
        raise RuntimeError("the run validated before the timed steps ended: leave "
                           "trainer.val_check_interval at its default (once per epoch).")
    return {"loop_steps_s": CLOCK["steps"] / (CLOCK["train_end"] - CLOCK["train_start"]),
            "timed_steps": CLOCK["steps"],
            "val_s": CLOCK.get("val_end", CLOCK["train_end"]) - CLOCK["train_end"],
            "loop_fit_s": fit}


def count_syncs(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Host reads per training step, and where they are made (an untimed, shorter run)."""
    cfg = compose(args, out, [f"sampler.batches_per_epoch={min(args.steps, 25)}"])
    with open_dict(cfg):
        cfg.callbacks["host_syncs"] = {"_target_": "__main__.CountedSyncs"}
    run(cfg)
    counter = SYNCS.pop()
    steps = max(counter.steps, 1)
    return {"host_syncs_per_step": sum(counter.counts.values()) / steps,
            "host_syncs_by_step": counter.per_step,
            "host_sync_lines": {k: v / steps for k, v in counter.counts.most_common()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="omniglot_maml_5w1s")
    parser.add_argument("--task", default="synthetic_images",
                        help="task config (synthetic_images: no data needed; omniglot_small ...)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--logger", default="wandb", help="as sharebone-train: wandb (offline "
                        "without credentials), csv, tensorboard, none")
    parser.add_argument("--steps", type=int, default=50, help="timed meta-batches")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", default="auto")
    parser.add_argument("--no-syncs", action="store_true", help="skip the host-sync count")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both sides")
    args = parser.parse_args(argv)

    bare, loop = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            cfg = compose(args, Path(tmp) / f"bare{r}")
            tasks = int(cfg.sampler.meta_batch_size)
            if cfg.get("keep_freed_memory", True):
                keep_freed_memory()  # as train.run does, for both sides
            set_float32_matmul_precision(cfg.get("float32_matmul_precision", "auto"))
            bare.append(bare_steps_per_second(cfg, args))
            loop.append(loop_run(compose(args, Path(tmp) / f"loop{r}"), args.warmup))
        syncs = {} if args.no_syncs else count_syncs(args, Path(tmp) / "syncs")
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "experiment": args.experiment, "task": args.task, "logger": args.logger,
        "overrides": args.overrides, "steps": args.steps, "warmup": args.warmup,
        "torch_threads": torch.get_num_threads(),
        "bare_steps_s": statistics.median(bare),
        "loop_steps_s": statistics.median(r["loop_steps_s"] for r in loop),
        "loop_fit_s": statistics.median(r["loop_fit_s"] for r in loop),
        "val_s": statistics.median(r["val_s"] for r in loop),
        "runs": {"bare_steps_s": bare, "loop": loop}, **syncs}
    # Each repeat's loop over its own bare step: a busy machine drifts between repeats.
    result["ratio"] = statistics.median(r["loop_steps_s"] / b
                                        for b, r in zip(bare, loop, strict=True))
    result["meta_batch_size"] = tasks
    result["bare_tasks_s"], result["loop_tasks_s"] = (
        tasks * result["bare_steps_s"], tasks * result["loop_steps_s"])
    print(f"\n{args.experiment} on {args.task}, {result['device']}, logger={args.logger}, "
          f"{args.steps} timed steps after {args.warmup}, median of {args.repeats}:")
    print(f"  bare step        {result['bare_steps_s']:8.2f} steps/s "
          f"({result['bare_tasks_s']:.1f} tasks/s at meta-batch {tasks})")
    print(f"  sharebone-train  {result['loop_steps_s']:8.2f} steps/s "
          f"({result['loop_tasks_s']:.1f} tasks/s)   ratio "
          f"{result['ratio']:.3f}   (fit {result['loop_fit_s']:.1f} s, validation "
          f"{result['val_s']:.2f} s)")
    if syncs:
        print(f"  host syncs per training step: {syncs['host_syncs_per_step']:.2f}")
        for where, n in syncs["host_sync_lines"].items():
            print(f"    {n:6.2f}  {where}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
