"""Multitask vs single-task error as task relatedness varies, for several loss weightings.

    python scripts/multitask_relatedness.py          # r in 0..1; equal, pcgrad, uncertainty
    python scripts/multitask_relatedness.py --weightings equal,mgda,gradnorm --seeds 3
    python scripts/multitask_relatedness.py --quick                # seconds, for tests

On :class:`~sharebone.data.multitask.SyntheticRegressionTasks` (``y_t = a_t . tanh(B_t x)``,
``B_t = r B_0 + sqrt(1 - r^2) P_t``), for each relatedness ``r`` and seed it trains

- one :class:`~sharebone.regimes.MultiTask` model (shared MLP backbone, one linear head per task)
  per weighting, on all tasks jointly, and
- the single-task baseline: the same architecture trained on each task alone,

for the same number of steps on the same examples (each model keeps its weights of lowest
validation MSE, checked every ``--val-every`` steps, on held-out examples), and reports the
held-out test MSE averaged over tasks (mean ± 95% CI over tasks x seeds), plus the mean pairwise
cosine between task gradients on the backbone at the end of multitask training (negative:
conflict). Training calls
the regime's own ``training_step`` and ``configure_optimizers`` in a plain loop (no Trainer: the
models are tiny and the loop overhead would dominate). Writes ``relatedness.md``, ``.csv`` and
``.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import math
import sys
from pathlib import Path
from typing import Any

import torch

from sharebone.data.multitask import SyntheticRegressionTasks, TaskBatches, TaskSet
from sharebone.regimes.multitask import MultiTask
from sharebone.regimes.weighting import cosine_matrix


def train(data: TaskSet, weighting: str, args: argparse.Namespace, seed: int,
          val: TaskSet | None = None) -> MultiTask:
    """Adam on task-balanced batches; with ``val``, early stopping: the weights with the lowest
    mean validation MSE (checked every ``--val-every`` steps) are kept."""
    torch.manual_seed(seed)
    model = MultiTask({"name": "mlp", "in_features": data.inputs.shape[1], "hidden": args.hidden},
                      heads=data.heads, weighting={"name": weighting}, loss="mse", lr=args.lr,
                      batch_size=args.batch_size, conflict_every=0)
    optimizer = model.configure_optimizers()
    batches = TaskBatches(data, per_task=args.batch_size, length=args.steps, seed=seed)
    best, best_state = float("inf"), None
    for step in range(args.steps):
        model.train()
        loss = model.training_step(batches[step], step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if val is not None and (step + 1) % args.val_every == 0:
            error = sum(test_mse(model.eval(), val).values())
            if error < best:
                best, best_state = error, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval()


@torch.no_grad()
def test_mse(model: MultiTask, data: TaskSet) -> dict[str, float]:
    errors = {}
    for t, name in enumerate(data.names):
        rows = data.task == t
        predictions = model.heads[name](model.backbone(data.inputs[rows])).squeeze(-1)
        errors[name] = float((predictions - data.targets[rows]).pow(2).mean())
    return errors


def mean_conflict(model: MultiTask, data: TaskSet, seed: int) -> float:
    """Mean pairwise cosine between the task gradients on the backbone, on one batch."""
    inputs, targets, task = TaskBatches(data, per_task=64, length=1, seed=seed + 999)[0]
    features = model.backbone(inputs)
    losses = torch.stack([model.task_loss(model.heads[n](features[task == t]), targets[task == t])
                          for t, n in enumerate(data.names)])
    cosine = cosine_matrix(model.task_gramian(losses))
    off = ~torch.eye(len(data.names), dtype=torch.bool)
    return float(cosine[off].mean())


def summarize(values: list[float]) -> tuple[float, float]:
    x = torch.tensor(values, dtype=torch.float64)
    std = float(x.std(unbiased=False)) if len(values) > 1 else 0.0
    return float(x.mean()), 1.96 * std / math.sqrt(len(values))


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for r in args.relatedness:
        per_method: dict[str, list[float]] = {"single-task": []}
        conflicts: dict[str, list[float]] = {}
        for seed in range(args.seeds):
            family = SyntheticRegressionTasks(num_tasks=args.tasks, input_dim=args.input_dim,
                                              latent_dim=args.latent_dim, relatedness=r,
                                              samples_per_task=args.samples, noise=args.noise,
                                              seed=seed)
            data, held_out = family.tasks("train"), family.tasks("test")
            val = family.tasks("val") if args.val_every else None
            for name in data.names:
                single = train(data.subset([name]), "equal", args, seed,
                               val.subset([name]) if val is not None else None)
                per_method["single-task"].append(test_mse(single, held_out.subset([name]))[name])
            for weighting in args.weightings:
                model = train(data, weighting, args, seed, val)
                per_method.setdefault(weighting, []).extend(test_mse(model, held_out).values())
                conflicts.setdefault(weighting, []).append(mean_conflict(model, data, seed))
        for method, errors in per_method.items():
            mean, ci = summarize(errors)
            conflict = (summarize(conflicts[method])[0] if method in conflicts else float("nan"))
            rows.append({"relatedness": r, "method": method, "test_mse": mean, "ci95": ci,
                         "gradient_cosine": conflict, "tasks_x_seeds": len(errors)})
            print(f"[relatedness] r={r:.2f} {method:>12}: test MSE {mean:.4f} ± {ci:.4f}"
                  + ("" if math.isnan(conflict) else f"  (task-gradient cosine {conflict:+.3f})"),
                  flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = ["relatedness"] + [f"{m} MSE" for m in methods] + [
        f"{m} grad cos" for m in methods if m != "single-task"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rel in args.relatedness:
        mine = {r["method"]: r for r in rows if r["relatedness"] == rel}
        cells = [f"{rel:.2f}"] + [f"{mine[m]['test_mse']:.4f} ± {mine[m]['ci95']:.4f}"
                                  for m in methods]
        cells += [f"{mine[m]['gradient_cosine']:+.3f}" for m in methods if m != "single-task"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{args.tasks} tasks, {args.samples} training examples each, input dim "
              f"{args.input_dim}, latent dim {args.latent_dim}, noise {args.noise}; MLP "
              f"{args.hidden} backbone, {args.steps} Adam steps (lr {args.lr}; early stopping on "
              f"validation MSE every {args.val_every} steps, 0 = off), {args.batch_size} "
              f"examples per task per step; {args.seeds} seed(s). Test MSE on held-out examples of "
              "the same tasks, mean ± 95% CI over tasks x seeds. grad cos: mean pairwise cosine "
              "of task gradients on the backbone after training."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ax.errorbar([r["relatedness"] for r in mine], [r["test_mse"] for r in mine],
                    yerr=[r["ci95"] for r in mine], marker="o", capsize=3, label=method,
                    linestyle="--" if method == "single-task" else "-")
    ax.set(xlabel="task relatedness r", ylabel="held-out test MSE",
           title="multitask vs single-task")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--relatedness", default="0,0.25,0.5,0.75,1")
    p.add_argument("--weightings", default="equal,pcgrad,uncertainty")
    p.add_argument("--tasks", type=int, default=6)
    p.add_argument("--samples", type=int, default=16, help="training examples per task")
    p.add_argument("--input-dim", type=int, default=16)
    p.add_argument("--latent-dim", type=int, default=4)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--hidden", default="32,8", help="MLP backbone widths")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=16, help="examples of each task per step")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--val-every", type=int, default=10,
                   help="early stopping on held-out validation examples (0: off)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="outputs/multitask_relatedness")
    args = p.parse_args(argv)
    if args.quick:
        args.relatedness, args.tasks, args.steps, args.seeds = "0,1", 3, 20, 1
    args.relatedness = [float(x) for x in args.relatedness.split(",")]
    args.weightings = args.weightings.split(",")
    args.hidden = [int(x) for x in args.hidden.split(",")]
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = measure(args)
    table = markdown(rows, args)
    (out / "relatedness.md").write_text(table)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    (out / "relatedness.csv").write_text(buf.getvalue())
    plot(rows, out / "relatedness.png")
    print("\n" + table)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
