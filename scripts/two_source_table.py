"""Two sources together versus each alone: ProtoNet and MAML (zero-init head), scored per source.

    nice -n 10 python scripts/two_source_table.py --data-dir ../shared/data   # ~25 min, CPU
    python scripts/two_source_table.py --quick                                # seconds

Sources: ``omniglot_small`` (1 channel, 28 px; its train / val / test alphabets) and a
generated folder of natural-image-like classes (``--out``/natural: each class a colour
palette over a smooth random field with its own oriented texture; each image a random phase,
shift and noise of it; RGB, decoded at 28 px; classes split 0.5 / 0.2 / 0.3 at random). Both
are converted to the backbone's input (3 channels, 28 px; grey repeated into RGB) by the
``sources`` family. Each regime is trained three times from the same seed, for the same
``--steps`` (and at most ``--budget-seconds``): on Omniglot only, on the images only
(``task.family.weights`` 1/0 and 0/1: the other source is never drawn), and on both (uniform).
Each run is then scored on both sources' test classes (5-way 1-shot, ``--episodes`` episodes,
the same ones for every run: ``test.seed``), mean ± 95% CI. Writes ``two_source.md`` and
``two_source.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf, open_dict
from PIL import Image

from sharebone.config import compose_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("omniglot_small", "natural")
TRAIN_ON = {"omniglot_small": [1.0, 0.0], "natural": [0.0, 1.0], "both": [1.0, 1.0]}
REGIMES = {"protonet": ["regime=protonet"],
           "maml_zero_head": ["regime=maml", "regime.head=zero", "regime.inner_steps=1",
                              "regime.test_inner_steps=3",
                              "sampler.meta_batch_size=4", "++trainer.gradient_clip_val=10.0"]}


def natural_folder(root: Path, n_classes: int, per_class: int, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: generated texture classes at 32x32 (made once)."""
    if (root / "done").is_file():
        return root
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    for c in range(n_classes):
        palette = rng.uniform(0, 255, (3, 3))
        field = rng.uniform(0, 1, (4, 4))
        angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 8)
        folder = root / f"scene_{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            smooth = np.asarray(Image.fromarray((field * 255).astype(np.uint8)).resize(
                (32, 32), Image.Resampling.BICUBIC)) / 255.0
            smooth = np.roll(smooth, rng.integers(0, 32, 2), axis=(0, 1))
            wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle))
                                      + rng.uniform(0, 2 * np.pi))
            mix = np.stack([smooth, wave, 1 - smooth], -1)  # weights of the three colours
            pixels = mix @ palette / mix.sum(-1, keepdims=True) + rng.normal(0, 25, (32, 32, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    (root / "done").write_text("")
    return root


def sources_block(natural: Path, cache_dir: Path, weights: list[float],
                  quick: bool) -> dict[str, Any]:
    omniglot = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "tasks" / "omniglot_small.yaml"
                                                     ).family)
    omniglot.update(data_dir="${data_dir}", cache_dir=str(cache_dir), image_size=28)
    if quick:  # generated grey classes stand in for Omniglot
        omniglot = {"name": "synthetic_images", "classes": {"train": 16, "val": 8, "test": 8},
                    "images_per_class": 20, "image_size": 28, "channels": 1, "seed": 0}
    folder = {"name": "image_folder", "root": str(natural), "image_size": 28, "channels": 3,
              "cache_dir": str(cache_dir), "source": "folder",
              "splits": {"train": 0.5, "val": 0.2, "test": 0.3}, "split_seed": 0}
    return {"name": "sources", "channels": 3, "image_size": 28, "weights": weights,
            "sources": [{"name": "omniglot_small", "channels": 1, "image_size": 28,
                         "family": omniglot},
                        {"name": "natural", "channels": 3, "image_size": 28, "family": folder}]}


def train_and_score(regime: str, train_on: str, args: argparse.Namespace, out: Path,
                    natural: Path) -> dict[str, Any]:
    from sharebone.run.train import run

    s = int(args.budget_seconds)
    overrides = ["task=multi_source", "task.channels=3", "task.image_size=28",
                 f"backbone={args.backbone}", f"seed={args.seed}", "logger=csv",
                 f"++trainer.max_steps={args.steps}", "trainer.max_epochs=100000",
                 f"++trainer.max_time='00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}'",
                 "trainer.enable_progress_bar=false", f"sampler.batches_per_epoch={args.every}",
                 f"sampler.val_episodes={args.val_episodes}", "test.settings=[{n_way: 5, "
                 "k_shot: 1}]", f"test.episodes={args.episodes}", "test.q_query=10",
                 f"test.seed={args.test_seed}", *REGIMES[regime]]
    if args.data_dir:
        overrides.append(f"data_dir={args.data_dir}")
    run_dir = out / f"{regime}-{train_on}"
    cfg = compose_config(overrides, run_dir, root_dir=REPO_ROOT)
    with open_dict(cfg):
        cfg.task.family = sources_block(natural, out / "cache", TRAIN_ON[train_on], args.quick)
    metrics = run(cfg)
    row = {"regime": regime, "trained_on": train_on,
           "train_seconds": round(metrics["train_seconds"], 1)}
    for source in SOURCES:
        row[source] = metrics[f"test/{source}/5w1s/acc"]
        row[f"{source}_ci95"] = metrics[f"test/{source}/5w1s/ci95"]
    return row


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"5-way 1-shot test accuracy per source ({args.episodes} episodes each, the same "
             f"for every run; {args.backbone}, {args.steps} steps or {args.budget_seconds} s, "
             f"seed {args.seed})", "",
             "| regime | trained on | omniglot_small test | natural test | train s |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        cells = [f"{100 * r[s]:.1f} ± {100 * r[f'{s}_ci95']:.1f}" for s in SOURCES]
        lines.append(f"| {r['regime']} | {r['trained_on']} | {cells[0]} | {cells[1]} | "
                     f"{r['train_seconds']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/two_source")
    parser.add_argument("--data-dir", default=None, help="holds omniglot/ (the small sets)")
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--train-on", default=",".join(TRAIN_ON),
                        help="which of omniglot_small, natural, both to train on")
    parser.add_argument("--backbone", default="conv4")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--budget-seconds", type=int, default=240)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--val-episodes", type=int, default=50)
    parser.add_argument("--every", type=int, default=200, help="steps between validations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-seed", type=int, default=12345)
    parser.add_argument("--quick", action="store_true",
                        help="seconds: generated grey classes for Omniglot, a few steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.episodes, args.val_episodes, args.every = 4, 20, 4, 2
        args.backbone = "conv4"
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    natural = natural_folder(out / "natural", n_classes=30 if args.quick else 60,
                             per_class=20)
    rows = []
    for regime in args.regimes.split(","):
        for train_on in args.train_on.split(","):
            rows.append(train_and_score(regime, train_on, args, out, natural))
            print(json.dumps(rows[-1]), flush=True)
    (out / "two_source.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows, args)
    (out / "two_source.md").write_text(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
