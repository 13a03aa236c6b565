"""Train every regime under one budget and score all of them on the very same test episodes.

    python scripts/compare_regimes.py --steps 300            # omniglot_small: minutes/regime, CPU
    python scripts/compare_regimes.py --budget-seconds 120 --episodes 600
    python scripts/compare_regimes.py --quick                       # seconds: generated images, MLP

Regimes: protonet, r2d2, maml/fomaml/anil/metasgd/reptile/imaml (those registered at run time),
pretrain, baseline_pp (``regime=pretrain regime.classifier=cosine``: Baseline++), multitask
(multitask trains on the same training classes split into tasks: one per alphabet on Omniglot).
Each is trained by ``sharebone.run.train.run`` for ``--steps`` optimizer steps and/or
``--budget-seconds`` of wall time, then scored on 5w1s, 5w5s, 20w1s and 20w5s test episodes fixed
by ``--test-seed``: every row sees identical support and query images (checked, and the
fingerprint is written into the table). Writes ``comparison.md``, ``comparison.csv`` and
``accuracy_vs_shots.png`` into ``--out``.

On W&B (offline without credentials; ``--wandb disabled`` turns it off) a comparison is one
group (``--name``, default ``compare-<task>-<time>``): a run per regime (``<regime>-<group>``,
job_type ``train``) with the comparison's settings in its config under ``comparison`` (budget,
task, seeds, test episodes) next to the run's own, its curves (train/val metrics over steps),
test scores (``test/<n>w<k>s/acc``) and figures, as ``sharebone-train`` logs them; then a run
``<group>-summary`` (job_type ``summary``) with the comparison's config, the table
``comparison`` (a row per regime) and the accuracy-vs-shots plot.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sharebone import tracking
from sharebone.config import compose_config
from sharebone.data.families import build_family
from sharebone.regimes import REGIMES

REPO_ROOT = Path(__file__).resolve().parents[1]
ORDER = ["protonet", "r2d2", "maml", "fomaml", "anil", "metasgd", "reptile", "imaml", "pretrain",
         "baseline_pp", "multitask"]
SETTINGS = [(5, 1), (5, 5), (20, 1), (20, 5)]
MAML_LIKE = ["sampler.meta_batch_size=4", "++trainer.gradient_clip_val=10.0"]
#: Per-regime settings within the shared budget (the papers' choices, scaled to a short run).
REGIME_OVERRIDES: dict[str, list[str]] = {
    "protonet": ["sampler.train.n_way=20", "sampler.train.q_query=5"],
    "maml": MAML_LIKE, "fomaml": MAML_LIKE, "anil": MAML_LIKE, "metasgd": MAML_LIKE,
    "reptile": MAML_LIKE, "imaml": MAML_LIKE, "r2d2": ["sampler.train.q_query=5"],
    "pretrain": [], "multitask": [],
}
#: Rows that are a regime with options, not a regime of their own: row -> (regime, overrides).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "baseline_pp": ("pretrain", ["regime.classifier=cosine"]),
}
#: How multitask sees each task family: the same training classes, split into tasks.
MULTITASK_VIEW: dict[str, list[str]] = {
    "omniglot_small": ["task=omniglot_alphabets"],
    "synthetic_images": ["task.family.name=synthetic_image_groups",
                         "+task.family.num_tasks=4"],
}


def compose_run(overrides: list[str], output_dir: Path) -> DictConfig:
    """The train config with overrides, as the Hydra app would hand it to ``run``."""
    return compose_config(overrides, output_dir, root_dir=REPO_ROOT)


def episodes_fingerprint(cfg: DictConfig) -> str:
    """sha256 of the first test episodes of every setting: equal fingerprints, equal tasks."""
    family = build_family(cfg.task.family)
    digest = hashlib.sha256()
    for n_way, k_shot in SETTINGS:
        episode = family.sampler("test", n_way=n_way, k_shot=k_shot, q_query=cfg.test.q_query,
                                 seed=cfg.test.seed).batch(range(2))
        for tensor in (episode.support, episode.query, episode.classes):
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def available_regimes(requested: list[str] | None) -> list[str]:
    names = [r for r in ORDER if VARIANTS.get(r, (r,))[0] in REGIMES]
    if requested:
        unknown = [r for r in requested if r not in names]
        if unknown:
            raise SystemExit(f"Unknown or unavailable regime(s) {unknown}; available: {names}")
        names = [r for r in names if r in requested]
    return names


def comparison_config(args: argparse.Namespace) -> dict[str, Any]:
    """What every regime of this comparison shares: the budget, task, seeds and test."""
    return {"name": args.name, "task": args.task, "backbone": args.backbone,
            "steps": args.steps, "budget_seconds": args.budget_seconds, "seed": args.seed,
            "test_seed": args.test_seed, "episodes": args.episodes, "q_query": args.q_query,
            "settings": [f"{n}w{k}s" for n, k in SETTINGS]}


def logger_overrides(args: argparse.Namespace, regime: str) -> list[str]:
    """W&B for one regime's training run: in the comparison's group, its settings in the
    run config under ``comparison``."""
    if args.wandb == "disabled":
        return ["logger=none"]
    shared = {k: v for k, v in comparison_config(args).items() if k != "settings"}
    return ["logger=wandb", f"logger.wandb.mode={args.wandb}", f"logger.wandb.group={args.name}",
            f"logger.wandb.name={regime}-{args.name}", "logger.wandb.tags=[comparison]",
            "+logger.wandb.job_type=train"] + [
        f"+comparison.{k}={'null' if v is None else v}" for k, v in shared.items()]


def base_overrides(args: argparse.Namespace) -> list[str]:
    settings = ", ".join(f"{{n_way: {n}, k_shot: {k}}}" for n, k in SETTINGS)
    o = [f"task={args.task}", f"backbone={args.backbone}", f"seed={args.seed}",
         f"test.settings=[{settings}]", f"test.episodes={args.episodes}",
         f"test.q_query={args.q_query}", f"test.batch_size={args.test_batch_size}",
         f"test.seed={args.test_seed}", f"sampler.val_episodes={args.val_episodes}",
         f"sampler.batches_per_epoch={args.batches_per_epoch}", "trainer.max_epochs=100000",
         "trainer.enable_progress_bar=false", f"trainer.log_every_n_steps={args.log_every}"]
    if args.steps:
        o.append(f"++trainer.max_steps={args.steps}")
    if args.budget_seconds:
        s = int(args.budget_seconds)
        o.append(f"++trainer.max_time='00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}'")
    if args.data_dir:
        o.append(f"data_dir={args.data_dir}")
    return o


def train_one(regime: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from sharebone.run.train import run

    name, variant = VARIANTS.get(regime, (regime, []))
    overrides = (base_overrides(args) + logger_overrides(args, regime) + [f"regime={name}"]
                 + REGIME_OVERRIDES.get(regime, []) + variant)
    if regime == "multitask":
        if args.task not in MULTITASK_VIEW:
            raise SystemExit(f"No multitask view of task {args.task}; "
                             f"known: {list(MULTITASK_VIEW)}")
        overrides += MULTITASK_VIEW[args.task]
    run_dir = out / regime
    cfg = compose_run(overrides, run_dir)
    fingerprint = episodes_fingerprint(cfg)
    metrics = run(cfg)
    saved = json.loads((run_dir / "fewshot.json").read_text())
    row: dict[str, Any] = {"regime": regime, "shared_params": saved["shared"],
                           "task_specific_params": saved["task_specific"]}
    for n, k in SETTINGS:
        row[f"{n}w{k}s"] = metrics[f"test/{n}w{k}s/acc"]
        row[f"{n}w{k}s_ci95"] = metrics[f"test/{n}w{k}s/ci95"]
    row["train_seconds"] = metrics["train_seconds"]
    row["episodes_sha"] = fingerprint
    return row


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = ["regime", "shared params", "task-specific params"]
    head += [f"{n}w{k}s (%)" for n, k in SETTINGS] + ["train time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["regime"], f"{r['shared_params']:,}", f"{r['task_specific_params']:,}"]
        cells += [f"{100 * r[f'{n}w{k}s']:.2f} ± {100 * r[f'{n}w{k}s_ci95']:.2f}"
                  for n, k in SETTINGS]
        cells.append(f"{r['train_seconds']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    budget = []
    if args.steps:
        budget.append(f"{args.steps} optimizer steps")
    if args.budget_seconds:
        budget.append(f"at most {args.budget_seconds} s of training")
    lines += ["", f"Task {args.task}, backbone {args.backbone}, budget: {' and '.join(budget)} "
              f"per regime; {args.episodes} test episodes per setting, {args.q_query} queries "
              f"per way (seed {args.test_seed}, "
              f"identical for every row: fingerprint {rows[0]['episodes_sha']}); mean ± 95% CI "
              "(1.96 std / sqrt(episodes)). Task-specific params: trained heads (pretrain, "
              "multitask; few-shot uses a fresh head fitted per support set), the adapted "
              "copy (MAML family), or the ridge weights solved per support set (r2d2)."]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buf.getvalue())


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ways = sorted({n for n, _ in SETTINGS})
    fig, axes = plt.subplots(1, len(ways), figsize=(5 * len(ways), 3.8), sharey=True)
    for ax, n in zip(axes, ways, strict=True):
        shots = [k for m, k in SETTINGS if m == n]
        for r in rows:
            ax.errorbar(shots, [100 * r[f"{n}w{k}s"] for k in shots],
                        yerr=[100 * r[f"{n}w{k}s_ci95"] for k in shots], marker="o",
                        capsize=3, label=r["regime"])
        ax.set(title=f"{n}-way", xlabel="shots (k)", xticks=shots)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_wandb(rows: list[dict[str, Any]], out: Path, png: Path,
                 args: argparse.Namespace) -> list[str]:
    """The summary run of the comparison's W&B group: its config, the table, the plot."""
    if args.wandb == "disabled":
        return []
    return summary_run(out, {"name": f"{args.name}-summary", "mode": args.wandb,
                             "group": args.name, "tags": ["comparison"]}, "comparison",
                       {**comparison_config(args), "regimes": [r["regime"] for r in rows]},
                       rows, {"accuracy_vs_shots": png})


def summary_run(out: Path, options: dict[str, Any], key: str, config: dict[str, Any],
                rows: list[dict[str, Any]], images: dict[str, Path]) -> list[str]:
    """A W&B run of ``job_type`` summary (``options``: name, mode, group, tags): ``config``
    under ``key``, the table ``key`` of ``rows``, and ``images`` by key; what finishing said."""
    loggers = tracking.wandb_loggers(tracking.build_loggers(
        {"wandb": {"project": "sharebone", "job_type": "summary", **options}}, out))
    for logger in loggers:
        tracking.safely(logger.log_hyperparams, {key: config})
    tracking.log_table(loggers, key, rows)
    for logger in loggers:
        for name, png in images.items():
            tracking.safely(logger.log_image, key=name, images=[str(png)])
    return tracking.finish(loggers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per regime")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="wall-clock training budget per regime (Lightning max_time)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: generated images, MLP backbone, a few steps and episodes")
    p.add_argument("--regimes", default=None, help="comma-separated subset, e.g. protonet,pretrain")
    p.add_argument("--task", default="omniglot_small")
    p.add_argument("--backbone", default="conv4")
    p.add_argument("--episodes", type=int, default=600, help="test episodes per setting")
    p.add_argument("--q-query", type=int, default=15, help="test queries per way")
    p.add_argument("--test-batch-size", default="auto",
                   help="test episodes per forward pass (auto: test.batch_size's default)")
    p.add_argument("--val-episodes", type=int, default=50)
    p.add_argument("--batches-per-epoch", type=int, default=100,
                   help="steps between validations (best.ckpt, which every row is scored from, "
                        "is chosen on them); must divide --steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--log-every", type=int, default=10,
                   help="training metrics logged every n optimizer steps")
    p.add_argument("--out", default="outputs/compare_regimes")
    p.add_argument("--wandb", default="auto", choices=["auto", "online", "offline", "disabled"])
    p.add_argument("--name", default=None,
                   help="the comparison's W&B group (default: compare-<task>-<time>)")
    args = p.parse_args(argv)
    if args.quick:
        args.task, args.backbone = "synthetic_images", "mlp"
        args.steps = args.steps or 4
        args.episodes, args.val_episodes = 6, 4
        args.batches_per_epoch = math.gcd(args.steps, 2)
        args.log_every = 1
    args.name = args.name or f"compare-{args.task}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.name):
        p.error(f"--name {args.name!r}: use letters, digits, '_', '.' and '-' only (it names "
                "the W&B group and runs, and goes into the runs' Hydra overrides)")
    if not args.steps and not args.budget_seconds:
        p.error("give a budget: --steps and/or --budget-seconds (or --quick)")
    if args.steps and args.steps % args.batches_per_epoch:
        # Validation (and so best.ckpt, which every row is scored from) runs at epoch ends; a
        # run that stops at max_steps mid-epoch is not validated again (one stopped by
        # --budget-seconds is).
        p.error(f"--steps {args.steps} is not a multiple of --batches-per-epoch "
                f"{args.batches_per_epoch}: validation runs at epoch ends, so the last "
                f"{args.steps % args.batches_per_epoch} steps would never reach the scored "
                f"checkpoint; give e.g. --batches-per-epoch {math.gcd(args.steps, 100)}")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    regimes = available_regimes(args.regimes.split(",") if args.regimes else None)
    rows = []
    for regime in regimes:
        print(f"\n[compare] === {regime} ===", flush=True)
        rows.append(train_one(regime, args, out))
        prints = {r["episodes_sha"] for r in rows}
        if len(prints) != 1:
            raise RuntimeError(f"Regimes were scored on different test episodes: {prints}")
        table = markdown(rows, args)  # written after every regime: a stopped run keeps its rows
        (out / "comparison.md").write_text(table)
        write_csv(rows, out / "comparison.csv")
    png = out / "accuracy_vs_shots.png"
    plot(rows, png)
    print("\n" + table)
    for note in log_to_wandb(rows, out, png, args):
        print(f"[compare] {note}")
    print(f"[compare] wrote {out / 'comparison.md'}, {out / 'comparison.csv'}, {png}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
