"""Parameter sharing made visible: how much each backbone layer moves when a task adapts it.

For a backbone before and after adaptation (MAML's inner loop, fine-tuning, a multitask run),
per layer:

- **relative weight change** ``||theta_after - theta_before|| / ||theta_before||`` over the
  layer's parameters (Raghu et al., ICLR 2020, arXiv:1909.09157, use this kind of per-layer
  comparison to show that MAML's adaptation is mostly head reuse);
- **linear CKA** between the layer's activations before and after on the same inputs
  (Kornblith, Norouzi, Lee & Hinton, ICML 2019, arXiv:1905.00414): 1 means the representation
  is unchanged up to rotation and scale, lower means the layer was re-learned.

``scripts/layer_change.py`` turns these rows into a table and a per-layer plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sharebone.errors import SettingError

__all__ = ["LayerGroup", "format_layer_table", "layer_activations", "layer_change",
           "layer_groups", "linear_cka", "plot_layer_change"]


@dataclass(frozen=True)
class LayerGroup:
    """One layer as fine-tuning and analysis see it: a conv block, or a linear layer with its
    batch norm. ``modules[-1]``'s output is the layer's activation."""

    name: str
    modules: tuple[nn.Module, ...]

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules for p in m.parameters()]


def _own_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def layer_groups(backbone: nn.Module) -> list[LayerGroup]:
    """The backbone's layers, input to output: the parameterised children of its first
    ``nn.Sequential`` that has more than one (conv4: its 4 blocks; mlp: each linear layer, a
    batch norm joining the layer before it). Falls back to the backbone's direct children.
    A backbone that knows its layers better says so with a ``layer_groups()`` method (a timm
    model: its stem, blocks and final norm).

    Example:
        >>> from sharebone.models import create_backbone
        >>> [g.name for g in layer_groups(create_backbone("conv4"))]
        ['blocks.0', 'blocks.1', 'blocks.2', 'blocks.3']
        >>> [g.name for g in layer_groups(create_backbone("mlp", hidden=[8, 4]))]
        ['layers.0', 'layers.2']
    """
    own = getattr(backbone, "layer_groups", None)
    if callable(own):
        return own()
    prefix, children = "", [(n, c) for n, c in backbone.named_children() if _own_parameters(c)]
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Sequential):
            inner = [(n, c) for n, c in module.named_children() if _own_parameters(c)]
            if len(inner) > 1:
                prefix, children = name, inner
                break
    groups: list[tuple[str, list[nn.Module]]] = []
    for name, child in children:
        if isinstance(child, _BatchNorm) and groups:
            groups[-1][1].append(child)
        else:
            groups.append((f"{prefix}.{name}" if prefix else name, [child]))
    return [LayerGroup(name, tuple(modules)) for name, modules in groups]


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centered kernel alignment of two representations ``[n, d1]``, ``[n, d2]`` of the
    same ``n`` inputs (Kornblith et al. 2019, Eq. 5): ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``
    on column-centred features. Invariant to rotation and isotropic scaling.

    Example:
        >>> x = torch.randn(50, 8)
        >>> q, _ = torch.linalg.qr(torch.randn(8, 8))
        >>> round(linear_cka(x, 3 * x @ q), 4)
        1.0
    """
    x = x.flatten(1).double()
    y = y.flatten(1).double()
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    norm = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return float(cross / norm) if norm > 0 else float("nan")


@torch.no_grad()
def layer_activations(backbone: nn.Module, inputs: torch.Tensor,
                      groups: Sequence[LayerGroup] | None = None) -> list[torch.Tensor]:
    """Each layer's output ``[n, ...]`` on ``inputs`` (backbone in eval mode)."""
    groups = list(groups) if groups is not None else layer_groups(backbone)
    outputs: list[torch.Tensor | None] = [None] * len(groups)
    hooks = []
    for i, group in enumerate(groups):
        def keep(_module, _inputs, output, i=i):
            outputs[i] = output.detach()

        hooks.append(group.modules[-1].register_forward_hook(keep))
    was_training = backbone.training
    backbone.eval()
    try:
        backbone(inputs)
    finally:
        backbone.train(was_training)
        for h in hooks:
            h.remove()
    return [o for o in outputs if o is not None]


def layer_change(before: nn.Module, after: nn.Module,
                 inputs: torch.Tensor | None = None) -> list[dict[str, float | str | int]]:
    """Per layer of two backbones of one architecture: parameter count, relative weight change
    and (when ``inputs`` are given) linear CKA of the activations before/after.

    Example:
        >>> from sharebone.models import create_backbone
        >>> a = create_backbone("mlp", in_features=4, hidden=[8, 4])
        >>> b = create_backbone("mlp", in_features=4, hidden=[8, 4])
        >>> b.load_state_dict(a.state_dict())
        <All keys matched successfully>
        >>> with torch.no_grad():                    # layer 2 doubled: moved by 100%, but
        ...     for p in b.layers[2].parameters():  # its features only scaled: CKA stays 1
        ...         _ = p.mul_(2)
        >>> rows = layer_change(a, b, torch.randn(20, 4))
        >>> [(r["layer"], round(r["relative_change"], 2), round(r["cka"], 2)) for r in rows]
        [('layers.0', 0.0, 1.0), ('layers.2', 1.0, 1.0)]
    """
    groups_before, groups_after = layer_groups(before), layer_groups(after)
    if [g.name for g in groups_before] != [g.name for g in groups_after]:
        raise SettingError("The two backbones have different layers; compare one architecture.")
    acts_before = layer_activations(before, inputs, groups_before) if inputs is not None else None
    acts_after = layer_activations(after, inputs, groups_after) if inputs is not None else None
    rows: list[dict[str, float | str | int]] = []
    for i, (gb, ga) in enumerate(zip(groups_before, groups_after, strict=True)):
        pb = torch.cat([p.detach().flatten() for p in gb.parameters()])
        pa = torch.cat([p.detach().flatten() for p in ga.parameters()])
        row: dict[str, float | str | int] = {
            "layer": gb.name, "params": pb.numel(),
            "relative_change": float((pa - pb).norm() / pb.norm().clamp_min(1e-12)),
        }
        if acts_before is not None and acts_after is not None:
            row["cka"] = linear_cka(acts_before[i], acts_after[i])
        rows.append(row)
    return rows


def format_layer_table(rows: Sequence[dict[str, float | str | int]]) -> str:
    """A Markdown table of :func:`layer_change` rows (several runs: add a ``"run"`` key)."""
    has_run = any("run" in r for r in rows)
    head = ("| run " if has_run else "") + "| layer | params | relative change | linear CKA |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        cka = f"{r['cka']:.4f}" if "cka" in r else "-"
        lines.append((f"| {r['run']} " if has_run else "")
                     + f"| {r['layer']} | {r['params']:,} | {r['relative_change']:.4f} | {cka} |")
    return "\n".join(lines)


def plot_layer_change(rows: Sequence[dict[str, float | str | int]], path: str) -> None:
    """Relative change and CKA per layer, one line per ``run`` (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(str(r.get("run", "")) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in runs:
        mine = [r for r in rows if str(r.get("run", "")) == run]
        layers = [str(r["layer"]) for r in mine]
        axes[0].plot(layers, [r["relative_change"] for r in mine], marker="o", label=run or None)
        if all("cka" in r for r in mine):
            axes[1].plot(layers, [r["cka"] for r in mine], marker="o", label=run or None)
    axes[0].set(title="relative weight change", ylabel="||after - before|| / ||before||")
    axes[1].set(title="linear CKA before vs after", ylabel="CKA", ylim=(0, 1.05))
    for ax in axes:
        ax.set_xlabel("layer (input -> output)")
        ax.tick_params(axis="x", rotation=30)
        if any(runs):
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
