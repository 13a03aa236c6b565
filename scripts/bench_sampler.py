"""Episodes/s of sharebone's EpisodeSampler vs learn2learn's TaskDataset on the same tensors.

Both samplers read the SAME in-memory uint8 Omniglot tensors (``[N, 1, 28, 28]`` images and
``[N]`` int64 labels): the two "small" background sets with rotations 0/90/180/270 (968
classes x 20 drawings), or, when those are not available (or with ``--random-data``), a random
uint8 tensor of the same shape (the output says which). Configurations: 5-way 1-shot 15-query
and 20-way 1-shot 5-query.

What is timed (one "call"; episodes/s = episodes per call x calls / seconds):

- ``sharebone, meta-batch 1``: ``sampler[i]`` -- one episode: draw the classes and images of
  episode ``i`` (counter-based hash), gather them (``index_select``), split into support
  ``[n_way*k_shot, 1, 28, 28]`` and query ``[n_way*q_query, 1, 28, 28]`` uint8 tensors with
  their int64 labels.
- ``sharebone, meta-batch 32``: ``sampler.batch(range(32*i, 32*(i+1)))`` -- 32 episodes at
  once, the same outputs stacked as ``[32, ...]`` tensors (what training consumes).
- ``learn2learn, 1 task``: ``taskset.sample()`` with the standard pipeline
  ``[NWays(n), KShots(k+q), LoadData, RemapLabels, ConsecutiveLabels]`` over
  ``MetaDataset(TensorDataset(images, labels))`` (its natural unit: one task, collated into a
  ``[n_way*(k+q), 1, 28, 28]`` uint8 batch with labels), then the support/query split of
  learn2learn's ProtoNet example (``torch.sort`` the labels, reorder, boolean support/query
  masks), giving the same uint8 support/query tensors and labels as ours.

Neither side converts to float or moves data to a device; both produce uint8 images (the
dtype of the shared tensors). Building the samplers (``EpisodeSampler(...)``,
``MetaDataset``/``TaskDataset``) is not timed.

Each measurement: warm-up, then a fixed number of calls sized to last about ``--seconds``
(default 1.5 s), timed with ``time.perf_counter``; repeated ``--repeats`` times (default 3),
the median is reported. ``torch.set_num_threads(--threads)`` (default 1: on a small, shared
machine intra-op threads on tiny tensor ops mostly add contention). The 1-minute load average
is recorded before and after every measurement.

Goals: sharebone >= 20x learn2learn, and >= 10,000 episodes/s for 20-way 1-shot on 2 cores.

``--variable``: Meta-Dataset-shaped episodes instead (``VariableEpisodeSampler``, the paper's
rules: 5-50 ways, support up to 500, queries up to 10 per class) on a random uint8
``[classes * per_class, 3, 84, 84]`` tensor: meta-batches/s of ``sampler.batch`` (ragged: one
gather for the whole meta-batch) against a plain memory copy of the same bytes, call by call
the same sizes: a contiguous block of the same images (at a moving offset) copied into fresh
huge-page memory (what the sampler writes into), and into one reused buffer (the copy
alone). Goal: within 2x of the fresh copy.

Usage:
    .venv/bin/python scripts/bench_sampler.py [--data-dir DIR] [--threads 1] [--json out.json]
    .venv/bin/python scripts/bench_sampler.py --variable [--classes 64 --per-class 200]
    .venv/bin/python scripts/bench_sampler.py --random-data --quick      # seconds, for tests
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sharebone.data.episodes import EpisodeSampler
from sharebone.data.variable import MetaDatasetShape, VariableEpisodeSampler
from sharebone.files import atomic_write
from sharebone.memory import empty_huge

REPO_ROOT = Path(__file__).resolve().parents[1]
SPLIT_SPEC = {
    "archives": ["images_background_small1", "images_background_small2"],
    "rotations": [0, 90, 180, 270],
}
#: 242 characters x 4 rotations, 20 drawings each: the shape of the random stand-in.
N_CLASSES, PER_CLASS, IMAGE_SIZE = 968, 20, 28
CONFIGS = ((5, 1, 15), (20, 1, 5))  # (n_way, k_shot, q_query)
META_BATCH = 32
GOAL_RATIO = 20.0
GOAL_EPS_20WAY = 10_000.0


# ----------------------------------------------------------------------------------- data


def default_data_dir() -> Path:
    env = os.environ.get("SHAREBONE_DATA_DIR")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"


def default_cache_dir() -> Path:
    env = os.environ.get("SHAREBONE_CACHE_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/sharebone").expanduser()


def random_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (N_CLASSES * PER_CLASS, 1, IMAGE_SIZE, IMAGE_SIZE),
                           dtype=torch.uint8, generator=g)
    labels = torch.arange(N_CLASSES).repeat_interleave(PER_CLASS)
    return images, labels


def load_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images, labels, description); real Omniglot when available, else random."""
    if args.random_data:
        images, labels = random_data()
        return images, labels, "random uint8 tensor (--random-data), shape of Omniglot small x4 rot"
    from sharebone.data.omniglot import load_split

    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    try:
        data = load_split(SPLIT_SPEC, data_dir=data_dir, cache_dir=cache_dir,
                          image_size=IMAGE_SIZE, download=False)
    except Exception as e:  # missing or unusable archives: benchmark on stand-in data
        print(f"NOTE: real Omniglot not available under {data_dir} ({type(e).__name__}: {e}); "
              "using a RANDOM uint8 tensor of the same shape instead.", file=sys.stderr)
        images, labels = random_data()
        return images, labels, (f"random uint8 tensor (real data unavailable under {data_dir}), "
                                "shape of Omniglot small x4 rot")
    desc = (f"real Omniglot images_background_small1+2, rotations 0/90/180/270 "
            f"({len(data.class_names)} classes) from {data_dir}")
    return data.images, data.labels, desc


# -------------------------------------------------------------------------------- samplers


def import_l2l() -> Any | None:
    noise = io.StringIO()  # gym (imported by learn2learn) prints a deprecation banner
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(noise):
            warnings.simplefilter("ignore")
            import learn2learn as l2l
    except Exception as e:  # not installed, or broken build
        print(f"NOTE: learn2learn not importable ({type(e).__name__}: {e}); "
              "benchmarking sharebone only.", file=sys.stderr)
        return None
    return l2l


def ours_calls(images: torch.Tensor, labels: torch.Tensor, n: int, k: int, q: int,
               meta_batch: int) -> Callable[[int], Any]:
    sampler = EpisodeSampler(images, labels, n, k, q, seed=0, split="train")
    if meta_batch == 1:
        return lambda i: sampler[i]
    return lambda i: sampler.batch(range(i * meta_batch, (i + 1) * meta_batch))


def l2l_calls(l2l: Any, images: torch.Tensor, labels: torch.Tensor, n: int, k: int,
              q: int) -> Callable[[int], Any]:
    from learn2learn.data.transforms import (
        ConsecutiveLabels,
        KShots,
        LoadData,
        NWays,
        RemapLabels,
    )

    meta = l2l.data.MetaDataset(torch.utils.data.TensorDataset(images, labels))
    with warnings.catch_warnings():  # 0.2.0 warns "TaskDataset is deprecated, use Taskset"
        warnings.simplefilter("ignore", DeprecationWarning)
        taskset = l2l.data.TaskDataset(
            meta,
            task_transforms=[NWays(meta, n), KShots(meta, k + q), LoadData(meta),
                             RemapLabels(meta), ConsecutiveLabels(meta)],
            num_tasks=-1,
        )
    # ProtoNet example's masks: after sorting by label, the first k of every way are support.
    support_mask = torch.zeros(n * (k + q), dtype=torch.bool)
    for offset in range(k):
        support_mask[torch.arange(n) * (k + q) + offset] = True
    query_mask = ~support_mask

    def call(_: int) -> tuple[torch.Tensor, ...]:
        data, task_labels = taskset.sample()
        order = torch.sort(task_labels).indices
        data, task_labels = data[order], task_labels[order]
        return (data[support_mask], task_labels[support_mask],
                data[query_mask], task_labels[query_mask])

    return call


# ---------------------------------------------------------------------------------- timing


def measure(call: Callable[[int], Any], per_call: int, seconds: float, repeats: int,
            warmup_s: float) -> dict[str, Any]:
    """Median episodes/s of ``repeats`` timed runs of a fixed number of calls."""
    i = 0
    calls = 0
    start = time.perf_counter()
    while calls < 3 or time.perf_counter() - start < warmup_s:  # warm-up and calibration
        call(i)
        i += 1
        calls += 1
    rate = calls / max(time.perf_counter() - start, 1e-9)
    n_calls = max(3, int(rate * seconds))
    load_before = os.getloadavg()[0]
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n_calls):
            call(i)
            i += 1
        runs.append(n_calls * per_call / (time.perf_counter() - t0))
    return {
        "episodes_per_s": statistics.median(runs),
        "runs_episodes_per_s": runs,
        "calls_per_run": n_calls,
        "episodes_per_run": n_calls * per_call,
        "load1_before": load_before,
        "load1_after": os.getloadavg()[0],
    }


# ------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="folder with omniglot/<archive>.zip "
                   "(default: $SHAREBONE_DATA_DIR or ../shared/data from the repo root)")
    p.add_argument("--cache-dir", help="decoded-data cache (default: $SHAREBONE_CACHE_DIR or "
                   "~/.cache/sharebone)")
    p.add_argument("--random-data", action="store_true",
                   help="use a random uint8 tensor of Omniglot's shape; no real data needed")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--seconds", type=float, default=1.5, help="target seconds per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--warmup", type=float, default=0.3, help="warm-up seconds per measurement")
    p.add_argument("--quick", action="store_true",
                   help="tiny run (0.02 s per run, 0.01 s warm-up): checks that it works only")
    p.add_argument("--no-l2l", action="store_true", help="skip learn2learn even if installed")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--variable", action="store_true",
                   help="Meta-Dataset-shaped meta-batches at 84x84x3 vs a memory copy instead")
    p.add_argument("--classes", type=int, default=64, help="--variable: classes (default 64)")
    p.add_argument("--per-class", type=int, default=200,
                   help="--variable: images per class (default 200)")
    p.add_argument("--meta-batches", default="1,8",
                   help="--variable: meta-batch sizes, comma-separated (default 1,8)")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup = 0.02, 0.01
    if args.threads < 1 or args.repeats < 1 or args.seconds <= 0:
        p.error("--threads and --repeats must be >= 1, --seconds > 0")
    return args


def _fmt(x: float) -> str:
    return f"{x:,.0f}"


def render(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        "## Episode sampler throughput: sharebone vs learn2learn",
        "",
        f"- data: {meta['data']}; images {meta['images_shape']} {meta['images_dtype']}",
        f"- torch {meta['torch']}, learn2learn {meta['learn2learn'] or 'NOT INSTALLED'}, "
        f"Python {meta['python']}, {meta['cpu_count']} CPUs, torch threads: {meta['threads']}",
        f"- load average (1/5/15 min) at start: {meta['loadavg_start']}, "
        f"at end: {meta['loadavg_end']}",
        f"- {meta['repeats']} timed runs of ~{meta['seconds']} s each per row, median shown"
        + (" (--quick: numbers meaningless)" if meta["quick"] else ""),
        "",
        "| config | sampler | episodes/call | episodes/s (median) | runs (episodes/s) "
        "| x learn2learn |",
        "|---|---|---:|---:|---|---:|",
    ]
    for r in result["rows"]:
        ratio = f"{r['ratio_vs_l2l']:.1f}x" if r.get("ratio_vs_l2l") is not None else "-"
        runs = " / ".join(_fmt(x) for x in r["runs_episodes_per_s"])
        lines.append(f"| {r['config']} | {r['sampler']} | {r['episodes_per_call']} | "
                     f"{_fmt(r['episodes_per_s'])} | {runs} | {ratio} |")
    if meta["learn2learn"] is None:
        lines += ["", "learn2learn is NOT installed: sharebone rows only, no ratio "
                  "(install with scripts/install_learn2learn.sh)."]
    lines += ["", f"Goals: >= {GOAL_RATIO:.0f}x learn2learn; >= {_fmt(GOAL_EPS_20WAY)} "
              f"episodes/s for 20-way (on 2 cores)."]
    for r in result["rows"]:
        if r["sampler"].startswith("learn2learn"):
            continue
        checks = []
        if r.get("ratio_vs_l2l") is not None:
            ok = r["ratio_vs_l2l"] >= GOAL_RATIO
            checks.append(f"{r['ratio_vs_l2l']:.1f}x l2l {'MET' if ok else 'NOT met'}")
        if r["n_way"] == 20:
            ok = r["episodes_per_s"] >= GOAL_EPS_20WAY
            checks.append(f"{_fmt(r['episodes_per_s'])} eps/s {'MET' if ok else 'NOT met'}")
        if checks:
            lines.append(f"- {r['config']}, {r['sampler']}: " + "; ".join(checks))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run_variable(args) if args.variable else _run(args)
    finally:
        torch.set_num_threads(old_threads)


# ----------------------------------------------------------- Meta-Dataset-shaped episodes

VARIABLE_SIZE = 84
GOAL_VARIABLE = 2.0  # the sampler within 2x of a plain copy of the same bytes


def timed(calls: Callable[[int], Any], n: int, repeats: int) -> list[float]:
    """Seconds of ``calls(0..n-1)``, ``repeats`` times (after one warm-up pass of 3 calls)."""
    for i in range(min(3, n)):
        calls(i)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            calls(i)
        runs.append(time.perf_counter() - t0)
    return runs


def variable_rows(images: torch.Tensor, labels: torch.Tensor, meta_batch: int,
                  args: argparse.Namespace) -> dict[str, Any]:
    """One meta-batch size: the sampler, then copies of the very same byte counts."""
    base = EpisodeSampler(images, labels, 1, 1, 1, seed=0, split="train")
    sampler = VariableEpisodeSampler(base, MetaDatasetShape())
    per_image = images[0].numel()
    probe = sampler.batch(range(meta_batch))
    t0 = time.perf_counter()
    sampler.batch(range(meta_batch, 2 * meta_batch))
    n = max(3, int(args.seconds / max(time.perf_counter() - t0, 1e-6)))
    sizes = []  # images per meta-batch (support + query), call by call
    for i in range(n + 3):
        _, ways, shots, queries = sampler.draw_shape(
            torch.arange(i * meta_batch, (i + 1) * meta_batch))
        sizes.append(int(shots.sum() + (queries * ways).sum()))
    # The copies read the same images, a contiguous block of the call's size at a moving
    # offset (as the sampler, they read memory the previous call did not just bring into
    # the caches); the images repeated where one meta-batch holds more than the split.
    repeat = -(-max(sizes) * 2 // images.shape[0])
    flat = (images if repeat <= 1 else images.repeat(repeat, 1, 1, 1)).view(-1)
    reused = torch.zeros(max(sizes) * per_image, dtype=images.dtype)
    starts = [(i * 7919 * per_image) % (flat.numel() - max(sizes) * per_image + 1)
              for i in range(len(sizes))]

    def fresh(i: int) -> torch.Tensor:
        count, start = sizes[i] * per_image, starts[i]
        return empty_huge((count,), images.dtype).copy_(flat[start:start + count])

    def into_reused(i: int) -> torch.Tensor:
        count, start = sizes[i] * per_image, starts[i]
        return reused[:count].copy_(flat[start:start + count])

    runs = {
        "sampler": timed(lambda i: sampler.batch(range(i * meta_batch, (i + 1) * meta_batch)),
                         n, args.repeats),
        "copy, fresh memory": timed(fresh, n, args.repeats),
        "copy, reused buffer": timed(into_reused, n, args.repeats),
    }
    seconds = {k: statistics.median(v) for k, v in runs.items()}
    bytes_moved = sum(sizes[:n]) * per_image
    return {
        "meta_batch": meta_batch, "calls": n, "mean_images": sum(sizes[:n]) / n,
        "mean_mb": bytes_moved / n / 2**20, "example_ways": probe.ways.tolist()[:8],
        "meta_batches_per_s": {k: n / v for k, v in seconds.items()},
        "gb_per_s": {k: bytes_moved / v / 1e9 for k, v in seconds.items()},
        "runs_s": runs,
        "sampler_over_fresh_copy": seconds["sampler"] / seconds["copy, fresh memory"],
        "sampler_over_reused_copy": seconds["sampler"] / seconds["copy, reused buffer"],
    }


def _run_variable(args: argparse.Namespace) -> dict[str, Any]:
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    g = torch.Generator().manual_seed(0)
    count = args.classes * args.per_class
    images = torch.randint(0, 256, (count, 3, VARIABLE_SIZE, VARIABLE_SIZE), dtype=torch.uint8,
                           generator=g)
    labels = torch.arange(args.classes).repeat_interleave(args.per_class)
    batches = [int(b) for b in str(args.meta_batches).split(",")]
    rows = [variable_rows(images, labels, b, args) for b in batches]
    result = {"meta": {"images_shape": list(images.shape), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "cpu_count": os.cpu_count(),
                       "loadavg_start": loadavg_start,
                       "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                       "repeats": args.repeats, "quick": args.quick,
                       "goal_sampler_over_copy": GOAL_VARIABLE},
              "variable": rows}
    lines = ["## Meta-Dataset-shaped meta-batches vs a memory copy of the same bytes", "",
             f"- random uint8 {list(images.shape)}, torch threads {torch.get_num_threads()}, "
             f"load {loadavg_start} -> {result['meta']['loadavg_end']}"
             + (" (--quick: numbers meaningless)" if args.quick else ""), "",
             "| meta-batch | mean images (MB) | sampler | copy, fresh | copy, reused | "
             "sampler / fresh copy | sampler / reused copy |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rate = r["meta_batches_per_s"]
        lines.append(f"| {r['meta_batch']} | {r['mean_images']:.0f} ({r['mean_mb']:.1f}) | "
                     f"{rate['sampler']:.1f}/s | {rate['copy, fresh memory']:.1f}/s | "
                     f"{rate['copy, reused buffer']:.1f}/s | "
                     f"{r['sampler_over_fresh_copy']:.2f}x | "
                     f"{r['sampler_over_reused_copy']:.2f}x |")
    verdicts = [f"meta-batch {r['meta_batch']} "
                + ("MET" if r["sampler_over_fresh_copy"] <= GOAL_VARIABLE else "NOT met")
                for r in rows]
    lines += ["", f"Goal: sampler within {GOAL_VARIABLE:.0f}x of the fresh-memory copy: "
              + ", ".join(verdicts)]
    print("\n".join(lines), flush=True)
    if args.json:
        write_json(Path(args.json), result)
    return result


def write_json(path: Path, result: dict[str, Any]) -> None:
    """The results, written all at once or not at all."""
    with atomic_write(path, "w") as f:
        json.dump(result, f, indent=2)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    images, labels, desc = load_data(args)
    l2l = None if args.no_l2l else import_l2l()
    rows: list[dict[str, Any]] = []
    for n, k, q in CONFIGS:
        config = f"{n}-way {k}-shot {q}-query"
        measured = []
        for meta_batch in (1, META_BATCH):
            m = measure(ours_calls(images, labels, n, k, q, meta_batch), meta_batch,
                        args.seconds, args.repeats, args.warmup)
            measured.append({"sampler": f"sharebone, meta-batch {meta_batch}",
                             "episodes_per_call": meta_batch, **m})
        if l2l is not None:
            m = measure(l2l_calls(l2l, images, labels, n, k, q), 1, args.seconds,
                        args.repeats, args.warmup)
            base = m["episodes_per_s"]
            for r in measured:
                r["ratio_vs_l2l"] = r["episodes_per_s"] / base
            measured.append({"sampler": "learn2learn TaskDataset, 1 task",
                             "episodes_per_call": 1, "ratio_vs_l2l": 1.0, **m})
        for r in measured:
            rows.append({"config": config, "n_way": n, "k_shot": k, "q_query": q, **r})
    result = {
        "meta": {
            "data": desc,
            "images_shape": list(images.shape),
            "images_dtype": str(images.dtype).replace("torch.", ""),
            "torch": torch.__version__,
            "learn2learn": getattr(l2l, "__version__", "unknown") if l2l is not None else None,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "loadavg_start": loadavg_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "seconds": args.seconds,
            "repeats": args.repeats,
            "quick": args.quick,
            "goals": {"ratio_vs_l2l": GOAL_RATIO, "episodes_per_s_20way": GOAL_EPS_20WAY},
        },
        "rows": rows,
    }
    print(render(result), flush=True)
    if args.json:
        write_json(Path(args.json), result)
    return result


if __name__ == "__main__":
    main()
