"""How much each backbone layer changes when a trained model adapts to a task.

    # adaptation on test episodes: MAML-family checkpoints adapt with their own inner loop,
    # any other backbone is fine-tuned on each support set (fresh head, --steps SGD steps)
    python scripts/layer_change.py --checkpoint outputs/<maml run> --task omniglot_small
    python scripts/layer_change.py --checkpoint outputs/<pretrain run> --steps 20 --lr 0.01
    # fine-tuning runs against their source: one line per run in the plot
    python scripts/layer_change.py --checkpoint outputs/<pretrain run> \
        --compare outputs/<finetune probe run> outputs/<finetune gradual run>

Per layer (:func:`sharebone.models.analysis.layer_groups`: conv4's blocks, an MLP's linear layers):
relative weight change and linear CKA of the activations before vs after, on the episodes'
query images (mean over ``--episodes`` episodes). Writes ``layer_change.md``, ``.csv`` and
``.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sharebone.config import CONFIG_DIR
from sharebone.data.families import build_family
from sharebone.models.analysis import format_layer_table, layer_change, plot_layer_change
from sharebone.regimes import load_regime


def task_family(task: str, data_dir: str | None) -> Any:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        overrides = [f"task={task}", "paths.root_dir=.", "paths.output_dir=."]
        if data_dir:
            overrides.append(f"data_dir={data_dir}")
        cfg = compose(config_name="train", overrides=overrides)
    return build_family(cfg.task.family)


def adapted_backbone(model: Any, support: torch.Tensor, labels: torch.Tensor, n_way: int,
                     args: argparse.Namespace) -> torch.nn.Module:
    """The backbone after adapting to one task's support set."""
    backbone = copy.deepcopy(model.backbone)
    if hasattr(model, "adapt_task"):  # MAML family: its own inner loop, its own step count
        with torch.enable_grad():
            params, _ = model.adapt_task(support, labels, n_way, model.test_inner_steps,
                                         first_order=True)
        adapted = {k[len("backbone."):]: v.detach() for k, v in params.items()
                   if k.startswith("backbone.")}
        state = backbone.state_dict()
        state.update(adapted)
        backbone.load_state_dict(state)
        return backbone
    # Any other backbone: full fine-tuning of a fresh linear head and the backbone.
    head = torch.nn.Linear(backbone.num_features, n_way)
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=args.lr)
    backbone.train()
    with torch.enable_grad():
        for _ in range(args.steps):
            optimizer.zero_grad()
            F.cross_entropy(head(backbone(support)), labels).backward()
            optimizer.step()
    return backbone.eval()


def adaptation_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    model = load_regime(args.checkpoint).eval()
    family = task_family(args.task, args.data_dir)
    source = family.sampler(args.split, n_way=args.n_way, k_shot=args.k_shot,
                            q_query=args.q_query, seed=args.seed)
    runs: list[list[dict[str, Any]]] = []
    for i in range(args.episodes):
        episode = source.batch([i]).to_float().task(0)
        after = adapted_backbone(model, episode.support, episode.support_labels, args.n_way, args)
        runs.append(layer_change(model.backbone, after, episode.query))
    name = f"{model.regime_name}: adapt {args.n_way}w{args.k_shot}s"
    rows = []
    for layer in range(len(runs[0])):
        mine = [r[layer] for r in runs]
        rows.append({"run": name, "layer": mine[0]["layer"], "params": mine[0]["params"],
                     "relative_change": sum(r["relative_change"] for r in mine) / len(mine),
                     "cka": sum(r["cka"] for r in mine) / len(mine)})
    return rows


def comparison_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = load_regime(args.checkpoint).eval()
    family = task_family(args.task, args.data_dir)
    images = family.sampler(args.split, n_way=args.n_way, k_shot=args.k_shot,
                            q_query=args.q_query, seed=args.seed).batch(range(args.episodes))
    inputs = images.to_float().query.flatten(0, 1)
    rows = []
    for path in args.compare:
        other = load_regime(path).eval()
        label = f"{other.regime_name}" + (f" ({other.hparams.mode})"
                                          if "mode" in other.hparams else "")
        rows += [{"run": label, **r} for r in layer_change(base.backbone, other.backbone, inputs)]
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="the trained model (file or run dir)")
    p.add_argument("--compare", nargs="*", default=None,
                   help="checkpoints whose backbones to compare with --checkpoint's")
    p.add_argument("--task", default="omniglot_small")
    p.add_argument("--split", default="test")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--k-shot", type=int, default=5)
    p.add_argument("--q-query", type=int, default=15)
    p.add_argument("--steps", type=int, default=20, help="fine-tuning steps (non-MAML)")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning SGD lr (non-MAML)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/layer_change")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    rows = comparison_rows(args) if args.compare else adaptation_rows(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_layer_table(rows)
    (out / "layer_change.md").write_text(table + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    (out / "layer_change.csv").write_text(buf.getvalue())
    plot_layer_change(rows, str(out / "layer_change.png"))
    print(table)
    print(f"[layer_change] wrote {out / 'layer_change.md'}, .csv and .png")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
