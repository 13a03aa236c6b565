"""Sinusoid regression, MAML vs Meta-SGD: Li et al. (2017) Table 1 on a CPU budget.

For each K in 5, 10, 20 shots, train MAML and Meta-SGD (1-40-40-1 ReLU MLP, one inner step,
inner_lr / initial step size 0.01, meta-batch 25 tasks of K support + K query points, Adam 1e-3)
for ``--steps`` meta-iterations, then report the MSE after one adaptation step on 100 fixed test
tasks (test episodes 0..99 under seed 0, K support points, ``--test-points`` query points each).
Two protocols, each against its own figures:

- ``--protocol finn`` (Finn et al. 2017's tasks: amplitude U[0.1, 5], phase U[0, pi], frequency
  1). Reference figures MAML 0.686 / 0.435 / 0.228, Meta-SGD 0.482 / 0.258 / 0.127 for 5 / 10 /
  20 shots: as an earlier issue quoted them, attributed to Li et al. (2017) Table 1, but that
  source could NOT be confirmed (they may be Lee & Choi 2018's re-run); unconfirmed.
- ``--protocol li`` (Li et al. 2017, Meta-SGD Table 1: frequency U[0.8, 1.2] as well,
  ``tasks/sinusoid_metasgd.yaml``; 60k meta-iterations, 100 test curves of 100 points, mean MSE
  ± 95% CI). Their 5-shot row: MAML 1.13 ± 0.18, Meta-SGD 0.90 ± 0.16 (the 10- and 20-shot
  cells are not given here).

The papers train for tens of thousands of meta-iterations: ``--steps 40000`` (about 3 minutes
per model on one core) is the budget the finn figures were compared at; the default 8000 is a
quicker look, with MAML's MSE 20-40% higher.

The training loop is a plain optimizer loop over :class:`sharebone.regimes.MAML` /
:class:`~sharebone.regimes.MetaSGD` (``episode_loss`` + Adam), i.e. what ``sharebone-train
experiment=sinusoid_maml`` runs without Lightning's per-step bookkeeping.

    python scripts/sinusoid_table.py                   # 6 models, ~5 min on one CPU core
    python scripts/sinusoid_table.py --steps 40000     # the table's budget, ~20 min
    python scripts/sinusoid_table.py --steps 2000 --out sinusoid.json
    python scripts/sinusoid_table.py --protocol li --shots 5 --steps 60000   # Meta-SGD's row
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from sharebone.data.sinusoid import SinusoidTasks
from sharebone.regimes import MAML, MetaSGD

#: Reference MSE per protocol, method and shots (None: not given), and where it comes from.
PUBLISHED = {
    "finn": {"maml": {5: 0.686, 10: 0.435, 20: 0.228},
             "metasgd": {5: 0.482, 10: 0.258, 20: 0.127}},
    "li": {"maml": {5: 1.13, 10: None, 20: None}, "metasgd": {5: 0.90, 10: None, 20: None}},
}
SOURCE = {"finn": "quoted figures, source unconfirmed",
          "li": "Li et al. 2017, Table 1"}
FREQUENCY = {"finn": (1.0, 1.0), "li": (0.8, 1.2)}
MLP = {"name": "mlp", "in_features": 1, "hidden": [40, 40]}


def train_and_test(method: str, k_shot: int, steps: int, meta_batch: int, test_tasks: int,
                   test_points: int, seed: int, protocol: str = "finn") -> dict:
    torch.manual_seed(seed)
    cls = MetaSGD if method == "metasgd" else MAML
    model = cls(MLP, n_way=1, inner_steps=1, inner_lr=0.01, loss="mse", vmap=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    family = SinusoidTasks(frequency=FREQUENCY[protocol])
    train = family.sampler("train", 1, k_shot, k_shot, seed)
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        episode = train.batch(range(step * meta_batch, (step + 1) * meta_batch))
        optimizer.zero_grad()
        loss, _ = model.episode_loss(episode)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    model.eval()
    test = family.sampler("test", 1, k_shot, test_points, 0).batch(range(test_tasks))
    scores = model.episode_metric(model.predict_episode(test).detach(), test.query_labels)
    unadapted = cls(MLP, n_way=1, inner_lr=0.01, loss="mse", vmap=True,
                    test_inner_steps=0).eval()
    unadapted.load_state_dict(model.state_dict())
    zero_step = unadapted.episode_metric(unadapted.predict_episode(test).detach(),
                                         test.query_labels)
    ci = 1.96 * scores.std(unbiased=False).item() / math.sqrt(test_tasks)
    return {"method": method, "k_shot": k_shot, "steps": steps, "mse": scores.mean().item(),
            "ci95": ci, "mse_before_adaptation": zero_step.mean().item(),
            "train_seconds": seconds, "protocol": protocol,
            "published": PUBLISHED[protocol][method][k_shot]}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8000, help="meta-iterations per model")
    parser.add_argument("--meta-batch", type=int, default=25)
    parser.add_argument("--shots", default="5,10,20")
    parser.add_argument("--methods", default="maml,metasgd")
    parser.add_argument("--test-tasks", type=int, default=100)
    parser.add_argument("--test-points", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--protocol", choices=sorted(PUBLISHED), default="finn",
                        help="finn: frequency 1; li: frequency U[0.8, 1.2] (Meta-SGD Table 1)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for method in args.methods.split(","):
        for k in (int(s) for s in args.shots.split(",")):
            row = train_and_test(method, k, args.steps, args.meta_batch, args.test_tasks,
                                 args.test_points, args.seed, args.protocol)
            rows.append(row)
            print(f"{method:8s} {k:2d}-shot: MSE {row['mse']:.3f} ± {row['ci95']:.3f} "
                  f"(before adapting {row['mse_before_adaptation']:.3f}; reference "
                  f"{_cell(row['published'])}) in {row['train_seconds']:.0f} s", flush=True)
    print(f"\n| method | 5-shot | 10-shot | 20-shot |  (protocol {args.protocol}, {args.steps} "
          f"meta-iterations, {args.test_tasks} test tasks, one step)")
    print("|---|---|---|---|")
    for method in args.methods.split(","):
        cells = {r["k_shot"]: r for r in rows if r["method"] == method}
        ours = " | ".join(f"{cells[k]['mse']:.3f} ± {cells[k]['ci95']:.3f}" if k in cells else "-"
                          for k in (5, 10, 20))
        paper = " | ".join(_cell(PUBLISHED[args.protocol][method][k]) for k in (5, 10, 20))
        print(f"| {method} (sharebone) | {ours} |")
        print(f"| {method} ({SOURCE[args.protocol]}) | {paper} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
