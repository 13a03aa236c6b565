"""How much to share: one task and backbone, every sharing preset, few-shot accuracy against
the number of task-specific parameters, one curve per regime.

    python scripts/sharing_study.py --steps 300                       # omniglot_small, CPU
    python scripts/sharing_study.py --task omniglot_small_within --settings 20w1s --steps 300
    python scripts/sharing_study.py --quick                           # seconds: generated data

Each preset of ``configs/sharing/`` (``all`` MAML, ``head`` ANIL, ``body`` BOIL,
``last_block``, ``norm``, ``bias`` BitFit, ``film``, ``residual`` adapters, ``lora``) says which
parameters adapt per task:

- the MAML family (``--maml-regime``, default ``maml``) adapts them in its inner loop, so every
  preset is a training run of its own; ``regime.test_inner_steps=auto``: its test-time steps
  are chosen on validation episodes;
- ProtoNet fine-tunes them on each support set at test time (P>M>F), ``sharing.test_steps``
  chosen on validation. The map changes nothing in its training but the added adapters, so
  ProtoNet is trained once per adapter kind (none, film, residual, lora) and each preset of
  that kind is scored on the trained weights (its own test-time choice, same episodes).

The x axis is the number of task-specific parameters: what adapts per task (``role_adapt``).
Every row is scored on the same seeded test episodes; validation episodes (never the test
ones) choose the test-time settings. Writes ``sharing_study.md``, ``sharing_study.csv``,
``sharing_study.json`` and ``accuracy_vs_task_params.png`` into ``--out``; on W&B (offline
without credentials; ``--wandb disabled`` turns it off) a summary run with the table and the
figure.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from compare_regimes import MAML_LIKE, compose_run, summary_run, write_csv
from omegaconf import OmegaConf

from sharebone.checkpoint_io import read_checkpoint
from sharebone.data.families import build_family
from sharebone.evaluation.fewshot import evaluate, test_episodes
from sharebone.evaluation.tuning import choose_on_validation
from sharebone.regimes import create_regime

PRESETS = ["all", "head", "body", "last_block", "norm", "bias", "film", "residual", "lora"]
#: The adapter kind each preset adds (ProtoNet is trained once per kind).
ADAPTERS = {"film": "film", "residual": "residual", "lora": "lora"}
PROTONET = ["sampler.train.n_way=20", "sampler.train.q_query=5"]


def parse_settings(text: str) -> list[tuple[int, int]]:
    settings = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)w(\d+)s", item.strip())
        if not match:
            raise SystemExit(f"--settings {text!r}: give e.g. 5w1s,20w1s")
        settings.append((int(match[1]), int(match[2])))
    return settings


def base_overrides(args: argparse.Namespace,
                   settings: list[tuple[int, int]] | None = None) -> list[str]:
    settings = ", ".join(f"{{n_way: {n}, k_shot: {k}}}" for n, k in settings or args.settings)
    o = [f"task={args.task}", f"backbone={args.backbone}", f"seed={args.seed}",
         f"test.settings=[{settings}]", f"test.episodes={args.episodes}",
         f"test.auto_episodes={args.auto_episodes}", f"test.seed={args.test_seed}",
         f"sampler.val_episodes={args.val_episodes}",
         f"sampler.batches_per_epoch={args.batches_per_epoch}", "trainer.max_epochs=100000",
         f"++trainer.max_steps={args.steps}", "trainer.enable_progress_bar=false",
         "logger=csv"]
    if args.data_dir:
        o.append(f"data_dir={args.data_dir}")
    return o + args.override


def scorable(cfg: Any, settings: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The settings a run can score. A MAML-family learned head that does not adapt (body,
    norm, bias) meets other ways than it was trained at with every row its mean row: every
    query scores alike, chance by construction, and sharebone refuses those settings."""
    if "inner_lr" not in cfg.regime or cfg.regime.get("head", "learned") != "learned":
        return settings
    adapt = cfg.sharing.get("adapt")
    if adapt is None or any(fnmatch.fnmatchcase("head.weight", p) for p in adapt):
        return settings
    return [(n, k) for n, k in settings if n == cfg.regime.n_way]


def row_of(regime: str, preset: str, scores: dict[str, tuple[float, float]],
           roles: dict[str, int], adapters: int, chosen: dict[str, Any] | None,
           seconds: float) -> dict[str, Any]:
    """One row: ``scores`` setting -> (mean, ci95); ``roles``: parameters per role."""
    row: dict[str, Any] = {"regime": regime, "preset": preset,
                           "task_params": roles.get("adapt", 0) + roles.get("task", 0),
                           "shared_params": roles.get("shared", 0),
                           "frozen_params": roles.get("frozen", 0), "adapter_params": adapters}
    for name, (mean, ci95) in scores.items():
        row[name], row[f"{name}_ci95"] = mean, ci95
    row["chosen"] = " ".join(f"{k.split('.')[-1]}={v}" for k, v in (chosen or {}).items())
    row["train_seconds"] = round(seconds, 1)
    return row


def train_and_score(regime: str, preset: str, extra: list[str], args: argparse.Namespace,
                    out: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """One training run (``sharebone.run.train.run``): its row and its best checkpoint;
    ``None, None`` when the preset can score none of the settings (:func:`scorable`)."""
    from sharebone.run.train import run

    run_dir = out / f"{regime}_{preset}"
    more = [f"regime={regime}", f"sharing={preset}", *extra]
    cfg = compose_run(base_overrides(args) + more, run_dir)
    kept = scorable(cfg, args.settings)
    if not kept:
        return None, None
    if kept != args.settings:
        cfg = compose_run(base_overrides(args, kept) + more, run_dir)
    metrics = run(cfg)
    saved = json.loads((run_dir / "fewshot.json").read_text())
    nan = float("nan")
    scores = {f"{n}w{k}s": (metrics[f"test/{n}w{k}s/acc"], metrics[f"test/{n}w{k}s/ci95"])
              if (n, k) in kept else (nan, nan) for n, k in args.settings}
    roles = {k.removeprefix("role_"): v for k, v in saved.items() if k.startswith("role_")}
    chosen = (saved.get("chosen_on_validation") or {}).get("chosen")
    row = row_of(regime, preset, scores, roles, saved.get("adapters", 0), chosen,
                 metrics["train_seconds"])
    return row, Path(saved["checkpoint"])


def rescore(checkpoint: Path, preset: str, args: argparse.Namespace,
            out: Path) -> dict[str, Any]:
    """ProtoNet's weights from ``checkpoint`` under another preset's map: its test-time
    settings chosen on validation, then scored on the study's test episodes."""
    cfg = compose_run(base_overrides(args) + ["regime=protonet", f"sharing={preset}"],
                      out / f"protonet_{preset}")
    saved = read_checkpoint(checkpoint)
    hparams = dict(saved["sharebone"]["hparams"])
    hparams["sharing"] = OmegaConf.to_container(cfg.sharing, resolve=True)
    hparams["sharing"]["test_steps"] = args.test_steps
    model = create_regime("protonet", **hparams)
    model.load_state_dict(saved["state_dict"])
    family = build_family(cfg.task.family)
    t = cfg.test
    val = test_episodes(family, t.settings, q_query=t.q_query, seed=t.seed, split="val")
    choice = choose_on_validation(model, val, episodes=t.auto_episodes)
    tests = test_episodes(family, t.settings, q_query=t.q_query, seed=t.seed)
    scores = {r.name: (r.mean, r.ci95) for r in evaluate(model, tests, episodes=t.episodes)}
    sharing = model.sharing_counts()
    return row_of("protonet", preset, scores, dict(sharing.roles or {}), sharing.adapters,
                  choice.chosen if choice else None, 0.0)


def study(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def keep(row: dict[str, Any] | None, preset: str) -> None:
        if row is None:
            print(f"[study] {args.maml_regime} {preset}: skipped, its head does not adapt and "
                  "no setting has the training ways", flush=True)
            return
        rows.append(row)
        print(f"[study] {row['regime']:>8} {row['preset']:<10} task params "
              f"{row['task_params']:>9,}  " + "  ".join(
                  f"{n}w{k}s {100 * row[f'{n}w{k}s']:.2f}" for n, k in args.settings),
              flush=True)
        (out / "sharing_study.md").write_text(markdown(rows, args))  # a stopped study keeps
        write_csv(rows, out / "sharing_study.csv")                   # its rows

    if "maml" in args.regimes:
        for preset in args.presets:
            row, _ = train_and_score(args.maml_regime, preset,
                                     [*MAML_LIKE, "regime.test_inner_steps=auto"], args, out)
            keep(row, preset)
    if "protonet" in args.regimes:
        trained: dict[str | None, Path] = {}
        for preset in args.presets:
            kind = ADAPTERS.get(preset)
            if kind not in trained:
                first = preset if kind else "none"
                auto = [f"sharing.test_steps={args.test_steps}"] if kind else []
                row, trained[kind] = train_and_score("protonet", first, [*PROTONET, *auto],
                                                     args, out)
                if first == preset:
                    keep(row, preset)
                    continue
            keep(rescore(trained[kind], preset, args, out), preset)
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    names = [f"{n}w{k}s" for n, k in args.settings]
    head = ["regime", "preset", "task-specific params", "adapter params",
            *[f"{s} (%)" for s in names], "test-time choice"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["regime"], r["preset"], f"{r['task_params']:,}", f"{r['adapter_params']:,}"]
        cells += ["-" if math.isnan(r[s]) else f"{100 * r[s]:.2f} ± {100 * r[f'{s}_ci95']:.2f}"
                  for s in names]
        cells.append(r["chosen"] or "-")
        lines.append("| " + " | ".join(cells) + " |")
    extra = f" ({' '.join(args.override)})" if args.override else ""
    lines += ["", f"Task {args.task}, backbone {args.backbone}{extra}, {args.steps} optimizer "
              "steps per "
              f"training run; {args.episodes} test episodes per setting (seed {args.test_seed}, "
              f"the same for every row), mean ± 95% CI. Test-time settings chosen on "
              f"{args.auto_episodes} validation episodes per setting. Task-specific params: "
              "those that adapt per task (the inner loop, or ProtoNet's test-time "
              "fine-tuning)." + ("" if args.test_steps == "auto" else
                                 f" ProtoNet: {args.test_steps} test-time Adam steps for "
                                 "every preset (not chosen).")]
    if any(math.isnan(r[s]) for r in rows for s in names):
        lines.append("\n-: not scored. The preset's learned head does not adapt, and at other "
                     "ways than it was trained at all its rows are its mean row: every query "
                     "scores alike, chance by construction (sharebone refuses the setting).")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{n}w{k}s" for n, k in args.settings]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for regime in dict.fromkeys(r["regime"] for r in rows):
            mine = sorted((r for r in rows if r["regime"] == regime
                           and not math.isnan(r[name])), key=lambda r: r["task_params"])
            xs = [max(r["task_params"], 1) for r in mine]
            ax.errorbar(xs, [100 * r[name] for r in mine],
                        yerr=[100 * r[f"{name}_ci95"] for r in mine], marker="o", capsize=3,
                        label=regime)
            for x, r in zip(xs, mine, strict=True):
                ax.annotate(r["preset"], (x, 100 * r[name]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.set(xscale="log", title=f"{args.task}, {name}", ylabel="test accuracy (%)",
               xlabel="task-specific (adapted) parameters, log scale")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_wandb(rows: list[dict[str, Any]], out: Path, png: Path,
                 args: argparse.Namespace) -> list[str]:
    if args.wandb == "disabled":
        return []
    config = {"task": args.task, "backbone": args.backbone, "steps": args.steps,
              "episodes": args.episodes, "presets": args.presets, "regimes": args.regimes}
    return summary_run(out, {"name": args.name, "mode": args.wandb, "tags": ["sharing_study"]},
                       "sharing_study", config, rows, {"accuracy_vs_task_params": png})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="omniglot_small")
    p.add_argument("--backbone", default="conv4")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per training run")
    p.add_argument("--settings", default="5w1s,20w1s", type=parse_settings)
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--regimes", default="maml,protonet")
    p.add_argument("--maml-regime", default="maml", help="maml or fomaml")
    p.add_argument("--episodes", type=int, default=600, help="test episodes per setting")
    p.add_argument("--auto-episodes", type=int, default=100,
                   help="validation episodes per setting that choose the test-time settings")
    p.add_argument("--val-episodes", type=int, default=50)
    p.add_argument("--test-steps", default="auto", type=lambda v: v if v == "auto" else int(v),
                   help="ProtoNet's test-time fine-tuning steps: auto (chosen on validation) "
                        "or a count for every preset")
    p.add_argument("--batches-per-epoch", type=int, default=100,
                   help="steps between validations (best.ckpt is chosen on them); must "
                        "divide --steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--override", action="append", default=[],
                   help="one more Hydra override for every run (repeatable)")
    p.add_argument("--out", default="outputs/sharing_study")
    p.add_argument("--wandb", default="auto", choices=["auto", "online", "offline", "disabled"])
    p.add_argument("--name", default=None, help="the W&B summary run's name")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: generated images, a small conv4, a few steps")
    args = p.parse_args(argv)
    if args.quick:
        args.task, args.settings = "synthetic_images", [(5, 1)]
        args.steps = args.steps or 3
        args.episodes, args.auto_episodes, args.val_episodes = 4, 2, 2
        args.batches_per_epoch = args.steps
        args.override = ["backbone.hidden=8", *args.override]
    if not args.steps:
        p.error("give a budget: --steps (or --quick)")
    args.presets = [s.strip() for s in args.presets.split(",")]
    unknown = sorted(set(args.presets) - set(PRESETS))
    if unknown:
        p.error(f"--presets: unknown {unknown}; known: {', '.join(PRESETS)}")
    args.regimes = [s.strip() for s in args.regimes.split(",")]
    if set(args.regimes) - {"maml", "protonet"}:
        p.error("--regimes: maml and/or protonet")
    if args.steps % args.batches_per_epoch:
        # Validation (and so best.ckpt, which every row is scored from) runs at epoch ends.
        p.error(f"--steps {args.steps} is not a multiple of --batches-per-epoch "
                f"{args.batches_per_epoch}: validation runs at epoch ends, so the last "
                f"{args.steps % args.batches_per_epoch} steps would never reach the scored "
                f"checkpoint; give e.g. --batches-per-epoch {math.gcd(args.steps, 100)}")
    args.name = args.name or f"sharing-{args.task}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = study(args, out)
    (out / "sharing_study.json").write_text(json.dumps(rows, indent=2))
    png = out / "accuracy_vs_task_params.png"
    plot(rows, args, png)
    print("\n" + markdown(rows, args))
    for note in log_to_wandb(rows, out, png, args):
        print(f"[study] {note}")
    print(f"[study] wrote {out / 'sharing_study.md'}, {out / 'sharing_study.csv'}, {png}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
