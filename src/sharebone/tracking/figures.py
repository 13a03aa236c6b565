"""The run's pictures, as matplotlib figures and PNG files: no W&B needed to see a run.

- :func:`episode_figure`: one few-shot episode, support images by class and query images
  titled with their predicted (and true) class, green when right, red when wrong;
- :func:`learning_curves`: loss and score per step from a run's ``csv/metrics.csv``;
- :func:`accuracy_vs_shots`: test score against ``k_shot``, a line per ``n_way``, 95% CI bars;
- :func:`score_vs_inner_steps`: MAML-family test score against the inner steps taken at test.

Figures are :class:`matplotlib.figure.Figure` objects drawn with the Agg canvas (no pyplot,
no global state, no display needed); :func:`save_png` writes one atomically. Accuracy plots
show chance (``1/n_way``) and start at zero.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sharebone.files import atomic_write

RIGHT, WRONG, UNKNOWN = "#1a7f37", "#cf222e", "#24292f"


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_png(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """``fig`` as a PNG at ``path`` (written to a temporary file and renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = png_bytes(fig, dpi)
    with atomic_write(path, "wb") as f:
        f.write(data)
    return path


# --------------------------------------------------------------------------------------------
# An episode with its predictions


def _display(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` images as ``[N, H, W]`` or ``[N, H, W, 3]`` floats in ``[0, 1]``."""
    x = images.detach().float().cpu()
    if images.dtype == torch.uint8:
        x = x / 255
    elif x.numel() and (x.min() < 0 or x.max() > 1):  # normalised inputs: stretch to [0, 1]
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    if x.shape[1] == 1:
        return x[:, 0]
    return x[:, :3].permute(0, 2, 3, 1)


def _show(ax: Any, image: torch.Tensor) -> None:
    ax.imshow(image.numpy(), cmap="gray" if image.dim() == 2 else None, vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def pick_queries(true: Sequence[int], n_way: int, limit: int) -> list[int]:
    """Up to ``limit`` query indices, taken class by class in turn (a mix of classes, not the
    first class's queries only); unlabelled queries (``-1``) in their own turn."""
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(true):
        by_class.setdefault(int(t), []).append(i)
    picked: list[int] = []
    queues = [by_class[c] for c in sorted(by_class)]
    while len(picked) < limit and any(queues):
        for q in queues:
            if q and len(picked) < limit:
                picked.append(q.pop(0))
    return sorted(picked)


def episode_figure(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
                   predicted: torch.Tensor, true: torch.Tensor | None = None,
                   class_names: Sequence[str] | None = None, title: str = "",
                   max_shots: int = 5, max_queries: int = 15,
                   max_classes: int = 20) -> Figure:
    """One episode: support images in a column per class (the first ``max_classes``
    classes, up to ``max_shots`` each), then up to ``max_queries`` query images, each titled
    ``predicted`` (and ``true`` where known, ``-1`` = unknown), green when right and red when
    wrong. The caps keep a 1,000-way episode a figure of seconds, not of an hour in
    matplotlib's layout; the titles say what was left out.

    ``support``/``query`` are one task's images ``[N, C, H, W]``, labels ``[N]`` in
    ``0..n_way-1``.
    """
    support_labels = support_labels.detach().cpu().long()
    predicted = predicted.detach().cpu().long()
    n_way = int(support_labels.max()) + 1 if support_labels.numel() else 1
    names = list(class_names) if class_names is not None else [str(c) for c in range(n_way)]
    true_list = ([-1] * len(predicted) if true is None
                 else [int(t) for t in true.detach().cpu().long()])
    drawn = min(n_way, max_classes)
    shots = [torch.nonzero(support_labels == c).flatten()[:max_shots].tolist()
             for c in range(drawn)]
    rows_support = max((len(s) for s in shots), default=1)
    shown = pick_queries(true_list, n_way, max_queries)
    columns = max(drawn, min(len(shown), 5)) if shown else drawn
    rows_query = max(1, math.ceil(len(shown) / columns))
    cell = 1.25
    fig = new_figure(max(columns * cell, 4.5), (rows_support + rows_query) * cell * 1.25 + 0.9)
    if title:
        fig.suptitle(title, fontsize=10)
    top, bottom = fig.subfigures(2, 1, height_ratios=[rows_support, rows_query * 1.2])
    classes = f"first {drawn} classes, " if drawn < n_way else ""
    top.suptitle(f"support set ({n_way}-way, {classes}{max(len(s) for s in shots)} shown per "
                 "class)", fontsize=9)
    axes = top.subplots(rows_support, columns, squeeze=False)
    support_images = _display(support)
    for c in range(columns):
        for r in range(rows_support):
            ax = axes[r][c]
            if c < drawn and r < len(shots[c]):
                _show(ax, support_images[shots[c][r]])
                if r == 0:
                    ax.set_title(_short(names[c]), fontsize=8)
            else:
                ax.axis("off")
    right = sum(1 for i in shown if true_list[i] >= 0 and true_list[i] == int(predicted[i]))
    labelled = sum(1 for i in shown if true_list[i] >= 0)
    score = f", {right}/{labelled} right" if labelled else ""
    bottom.suptitle(f"query set: predicted / true ({len(shown)} of {len(predicted)} "
                    f"shown{score})", fontsize=9)
    axes = bottom.subplots(rows_query, columns, squeeze=False)
    query_images = _display(query)
    for k, ax in enumerate(ax for row in axes for ax in row):
        if k >= len(shown):
            ax.axis("off")
            continue
        i = shown[k]
        _show(ax, query_images[i])
        p, t = int(predicted[i]), true_list[i]
        label = _short(names[p]) if p < len(names) else str(p)
        if t >= 0:
            label += f" / {_short(names[t]) if t < len(names) else t}"
            color = RIGHT if t == p else WRONG
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(2)
        else:
            label += " / ?"
            color = UNKNOWN
        ax.set_title(label, fontsize=7, color=color)
    return fig


def _short(name: str, width: int = 14) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


# --------------------------------------------------------------------------------------------
# Learning curves from the CSV log


def read_csv_log(path: str | Path) -> list[dict[str, float]]:
    """Rows of a Lightning ``metrics.csv`` as numbers (empty cells left out)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            values = {}
            for key, value in row.items():
                if key is None or value in (None, ""):
                    continue
                try:
                    values[key] = float(value)
                except ValueError:
                    continue
            if "step" in values:
                rows.append(values)
    return rows


def _series(rows: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    """``key`` per step in the trainer's rows (those with an ``epoch``: not the final summary
    row that the test results are logged in)."""
    points = sorted((r["step"], r[key]) for r in rows
                    if key in r and "epoch" in r and math.isfinite(r[key]))
    return [p[0] for p in points], [p[1] for p in points]


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def learning_curves(rows: Sequence[Mapping[str, float]], metric: str = "acc",
                    higher_is_better: bool = True, n_way: int | None = None,
                    title: str = "") -> Figure | None:
    """Loss and ``metric`` per optimizer step, training (raw, and a running mean when there
    are many steps) and validation; None when the log has no training rows."""
    if not any("train/loss" in r for r in rows):
        return None
    fig = new_figure(10, 3.8)
    if title:
        fig.suptitle(title, fontsize=10)
    for ax, name in zip(fig.subplots(1, 2), ("loss", metric), strict=True):
        steps, values = _series(rows, f"train/{name}")
        scale = 100 if name == "acc" else 1
        values = [scale * v for v in values]
        if len(values) >= 20:
            window = max(5, len(values) // 20)
            ax.plot(steps, values, color="C0", alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smooth(values, window), color="C0",
                    label=f"train (mean of {window} steps)")
        elif values:
            ax.plot(steps, values, color="C0", marker=".", label="train")
        steps, values = _series(rows, f"val/{name}")
        if values:
            ax.plot(steps, [scale * v for v in values], color="C1", marker="o", label="val")
        if name == "acc":
            if n_way:
                ax.axhline(100 / n_way, color="gray", linestyle="--", linewidth=1,
                           label=f"chance (1/{n_way})")
            ax.set_ylim(0, 100)
            ax.set_ylabel("accuracy (%)")
        else:
            ax.set_ylim(bottom=0)
            best = "higher" if higher_is_better else "lower"
            ax.set_ylabel(name if name == "loss" else f"{name} ({best} is better)")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------
# Test scores


def accuracy_vs_shots(results: Sequence[Any], title: str = "") -> Figure | None:
    """Test score against ``k_shot``, one line per ``n_way``, error bars the 95% CI; accuracy
    in %, from zero, with each ``n_way``'s chance level. ``results`` are
    :class:`~sharebone.evaluation.stats.FewShotResult`; None when there are none. Variable-
    shape results (``meta_dataset``: no one ``n_way``/``k_shot``) are left to the tables."""
    results = [r for r in results if getattr(r, "shape", "fixed") == "fixed"
               and getattr(r, "source", None) in (None, "average")]  # many sources: the mean
    if not results:
        return None
    metric = results[0].metric
    percent = metric == "acc"
    scale = 100 if percent else 1
    fig = new_figure(6, 4.2)
    ax = fig.subplots()
    ways = sorted({r.n_way for r in results})
    shots = sorted({r.k_shot for r in results})
    for i, n_way in enumerate(ways):
        rows = sorted((r for r in results if r.n_way == n_way), key=lambda r: r.k_shot)
        color = f"C{i}"
        ax.errorbar([r.k_shot for r in rows], [scale * r.mean for r in rows],
                    yerr=[scale * r.ci95 for r in rows], color=color, marker="o", capsize=4,
                    label=f"{n_way}-way" if percent or len(ways) > 1 else None)
        if percent:
            ax.axhline(100 / n_way, color=color, linestyle="--", linewidth=1, alpha=0.7,
                       label=f"chance, {n_way}-way (1/{n_way})")
    ax.set_xticks(shots)
    if len(shots) == 1:
        ax.set_xlim(shots[0] - 1, shots[0] + 1)
    ax.set_xlabel("shots per class (k_shot)" if percent else
                  "support examples per task (k_shot)")
    if percent:
        ax.set_ylim(0, 100)
        ax.set_ylabel("test accuracy (%), mean ± 95% CI")
    else:
        ax.set_ylim(bottom=0)
        ax.set_ylabel(f"test {metric} (lower is better), mean ± 95% CI")
    episodes = results[0].episodes
    ax.set_title(f"{title}\n{episodes} test episodes per setting" if title else
                 f"{episodes} test episodes per setting", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def score_vs_inner_steps(steps: Sequence[int], results: Sequence[Any], trained_steps: int,
                         test_steps: int, title: str = "") -> Figure:
    """MAML family: test score against the number of inner steps taken at test (one
    :class:`~sharebone.evaluation.stats.FewShotResult` per entry of ``steps``)."""
    first = results[0]
    percent = first.metric == "acc"
    scale = 100 if percent else 1
    fig = new_figure(6, 4.2)
    ax = fig.subplots()
    ax.errorbar(list(steps), [scale * r.mean for r in results],
                yerr=[scale * r.ci95 for r in results], marker="o", capsize=4, color="C0",
                label=f"{first.name}, {first.episodes} test episodes")
    ax.axvline(trained_steps, color="C2", linestyle=":", linewidth=1,
               label=f"steps in meta-training ({trained_steps})")
    ax.axvline(test_steps, color="C3", linestyle=":", linewidth=1,
               label=f"configured test steps ({test_steps})")
    if percent:
        if first.n_way:  # variable-way episodes (n_way 0) have no one chance level
            ax.axhline(100 / first.n_way, color="gray", linestyle="--", linewidth=1,
                       label=f"chance (1/{first.n_way})")
        ax.set_ylim(0, 100)
        ax.set_ylabel("test accuracy (%), mean ± 95% CI")
    else:
        ax.set_ylim(bottom=0)
        ax.set_ylabel(f"test {first.metric} (lower is better), mean ± 95% CI")
    ax.set_xticks(list(steps))
    ax.set_xlabel("inner (adaptation) steps on the support set at test")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
