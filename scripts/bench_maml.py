"""Meta-training throughput of sharebone's MAML against learn2learn's, at equal numerics.

Setting (Finn et al. 2017, Omniglot): conv4 with 64 channels, 5-way 1-shot 15-query episodes of
28x28 images, 1 inner step of 0.4, meta-batch 32, Adam; second and first order. Both sides run
the same model (stock ``nn.BatchNorm2d`` without running statistics for learn2learn, sharebone's
batch-statistics norm for sharebone: the same function) on the same episodes, and a float64
check first confirms that both give the same meta-gradient.

learn2learn is driven as in its examples (``maml.clone()``, ``adapt``, a backward per task);
sharebone as Lightning drives it (``episode_loss`` over the meta-batch, one backward). Each
configuration runs in its own subprocess; its peak memory is the kernel's peak-RSS mark
(``VmHWM``), reset after data loading and warm-up (the allocator keeps what warm-up freed, so
read the absolute peak, not the increase). ``sharebone`` is the default on CPU: tasks looped,
each task's meta-gradient taken as soon as it is done (``per_task_backward``);
``sharebone-one-backward`` keeps every task's graph for one backward of the meta-batch;
``sharebone-compile`` adds ``compile=True`` (its warm-up includes compiling; give it
``--warmup 2`` so that the timed meta-batches see no recompilation); ``sharebone-vmap`` batches
the tasks with torch.vmap. Like ``sharebone-train``, the sharebone runs keep freed memory in
the process (:func:`sharebone.memory.keep_freed_memory`); ``sharebone-default-malloc`` and
``learn2learn-keep-freed-memory`` separate that effect from the rest.

``sharebone-vmap-chunk4/8/16`` run the vmapped meta-batch in chunks of 4/8/16 tasks
(``vmap_chunk_size``), ``sharebone-vmap-auto`` sizes them from free GPU memory,
``sharebone-vmap-bf16`` runs vmap under bf16 autocast (what ``trainer.precision=bf16-mixed``
does), ``sharebone-checkpoint`` loops with ``checkpoint_inner_steps``.

``--device cuda`` (any torch device): the models and episodes live there, the timed region is
bracketed by ``torch.cuda.synchronize`` and peak memory is ``torch.cuda.max_memory_allocated``
(reset after warm-up; ``peak_mb`` in the table), next to the process's peak RSS. On a CPU one
more meta-batch runs under :class:`sharebone.memory.PeakMemory` after the timed ones: its peak
tensor memory (``tensor_peak_mb``) is what a GPU's ``max_memory_allocated`` counts, without
the allocator and interpreter that RSS includes, so the memory ratios to learn2learn and the
largest meta-batch that fits in ``--fit-gb`` (16 GiB) can be read on a CPU too.
``--preset issue12`` is issue 12's table: 5w1s15q at meta-batch 32 and 20w1s5q at meta-batch 16,
orders 2 and 1, learn2learn against vmap, chunked vmap (4/8/16) and the loop, 10 timed
meta-batches after 3 of warm-up, on CUDA unless ``--device`` says otherwise::

    python scripts/bench_maml.py                     # real Omniglot if SHAREBONE_DATA_DIR has it
    python scripts/bench_maml.py --data random --iters 3 --threads 1 --out bench.json
    python scripts/bench_maml.py --preset issue12 --data random --repeats 1 --out gpu.json
    python scripts/bench_maml.py --preset issue12 --backbone resnet12 --settings 5w1s15q:8
    python scripts/bench_maml.py --preset issue12 --device cpu --iters 1 --warmup 0 \\
        --repeats 1 --hidden 8 --impls learn2learn,sharebone-vmap-chunk4   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

N_WAY, K_SHOT, Q_QUERY, INNER_LR = 5, 1, 15, 0.4
SPEC = {"name": "conv4", "in_channels": 1, "hidden": 64, "image_size": 28}
#: ``--backbone``: the shared backbone and the images it takes (random data at that size; the
#: real Omniglot data only for conv4 at 28x28).
BACKBONES = {
    "conv4": SPEC,
    "conv4_84": {"name": "conv4", "in_channels": 3, "hidden": 32, "image_size": 84},
    "resnet12": {"name": "resnet12", "in_channels": 3, "image_size": 84},
}
#: The episode setting of this process (``--setting``): ways, shots, queries.
SETTING = {"n_way": N_WAY, "k_shot": K_SHOT, "q_query": Q_QUERY}
#: name -> (settings "<n>w<k>s<q>q:<meta-batch>", implementations, orders, device, iters, warmup)
PRESETS = {
    "issue12": ("5w1s15q:32,20w1s5q:16",
                "learn2learn,sharebone-vmap,sharebone-vmap-chunk4,sharebone-vmap-chunk8,"
                "sharebone-vmap-chunk16,sharebone,sharebone-vmap-bf16", "2,1", "cuda", 10, 3),
}
#: name -> (MAML options, or None for learn2learn; whether malloc keeps freed memory).
#: ``sharebone`` is what ``sharebone-train`` runs on a CPU (``keep_freed_memory: true``).
IMPLS = {
    "sharebone": ({}, True),
    "sharebone-compile": ({"compile": True}, True),
    "sharebone-one-backward": ({"vmap": False, "per_task_backward": False}, True),
    "sharebone-vmap": ({"vmap": True}, True),
    "sharebone-vmap-chunk4": ({"vmap_chunk_size": 4}, True),
    "sharebone-vmap-chunk8": ({"vmap_chunk_size": 8}, True),
    "sharebone-vmap-chunk16": ({"vmap_chunk_size": 16}, True),
    "sharebone-vmap-auto": ({"vmap_chunk_size": "auto"}, True),
    "sharebone-vmap-bf16": ({"vmap": True, "bf16": True}, True),
    "sharebone-checkpoint": ({"vmap": False, "checkpoint_inner_steps": True}, True),
    "sharebone-default-malloc": ({}, False),
    "learn2learn": (None, False),
    "learn2learn-keep-freed-memory": (None, True),
}


def episodes(data: str, meta_batch: int, batches: int):
    """``batches`` meta-batches of float episodes (real Omniglot-small train split, or random
    uint8 images of the same shape)."""
    from sharebone.data.episodes import EpisodeSampler

    if data == "real":
        from sharebone.data.tasks import OmniglotTasks

        splits = {"train": {"archives": ["images_background_small1", "images_background_small2"],
                            "alphabets": ["Balinese", "Greek", "Latin", "Japanese_(katakana)"],
                            "rotations": [0, 90, 180, 270]}}
        sampler = OmniglotTasks(splits, download=False).sampler("train", *SETTING.values(), 0)
    else:
        g = torch.Generator().manual_seed(0)
        size = SPEC["image_size"]
        images = torch.randint(0, 256, (100 * 20, SPEC["in_channels"], size, size), generator=g,
                               dtype=torch.uint8)
        sampler = EpisodeSampler(images, torch.arange(2000) // 20, *SETTING.values())
    return [sampler.batch(range(b * meta_batch, (b + 1) * meta_batch)).to_float()
            for b in range(batches)]


def sharebone_step(first_order: bool, device: str = "cpu", bf16: bool = False, **options):
    """One optimizer step on a meta-batch, as Lightning takes it (``episode_loss``, one
    ``backward``, the optimizer); ``options`` go to :class:`~sharebone.regimes.MAML`;
    ``bf16``: the loss under bf16 autocast, as ``trainer.precision=bf16-mixed`` runs it."""
    from sharebone.regimes import MAML

    torch.manual_seed(0)
    model = MAML(SPEC, n_way=SETTING["n_way"], inner_lr=INNER_LR, first_order=first_order,
                 **options).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    device_type = torch.device(device).type

    def step(episode):
        optimizer.zero_grad()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model.episode_loss(episode)
        loss.backward()
        optimizer.step()
        return loss.item()

    return model, step


def learn2learn_step(first_order: bool, device: str = "cpu"):
    import learn2learn as l2l
    from torch.func import replace_all_batch_norm_modules_

    from sharebone.models import create_backbone

    torch.manual_seed(0)
    backbone = replace_all_batch_norm_modules_(create_backbone(**SPEC))
    net = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.num_features, SETTING["n_way"]))
    maml = l2l.algorithms.MAML(net.to(device), lr=INNER_LR, first_order=first_order)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)

    def step(episode):
        optimizer.zero_grad()
        total = 0.0
        tasks = episode.num_tasks
        for t in range(tasks):
            learner = maml.clone()
            learner.adapt(F.cross_entropy(learner(episode.support[t]), episode.support_labels[t]))
            loss = F.cross_entropy(learner(episode.query[t]), episode.query_labels[t]) / tasks
            loss.backward()
            total += loss.item()
        optimizer.step()
        return total

    return maml, step


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def worker(impl: str, order: int, data: str, meta_batch: int, iters: int, warmup: int,
           device: str = "cpu") -> dict:
    batches = [b.to(device) for b in episodes(data, meta_batch, warmup + iters)]
    first_order = order == 1
    options, keep_freed = IMPLS[impl]
    if keep_freed:
        from sharebone.memory import keep_freed_memory

        keep_freed_memory()
    if options is None:
        _, step = learn2learn_step(first_order, device)
    else:
        model, step = sharebone_step(first_order, device, **options)
    cuda = torch.device(device).type == "cuda"
    for b in batches[:warmup]:
        step(b)
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    base = rss_mb("VmRSS")
    reset_peak = reset_peak_rss()
    started = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    synchronize(device)
    seconds = time.perf_counter() - started
    peak = rss_mb("VmHWM") if reset_peak else float("nan")
    device_peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else float("nan")
    # On a CPU, one more meta-batch under PeakMemory (the profiler's allocation records, too
    # slow to time): the tensor memory a GPU would count, which RSS hides under the allocator.
    tensor_peak = device_peak
    if torch.device(device).type == "cpu":
        from sharebone.memory import PeakMemory

        with PeakMemory(device) as tensors:
            step(batches[-1])
        tensor_peak = tensors.bytes / 2**20
    chunk = vars(model).get("auto_chunk_size") if options is not None else None
    return {"impl": impl, "order": order, "setting": setting_name(meta_batch),
            "meta_batch": meta_batch,
            "device": device, "peak_mb": device_peak if cuda else peak, "auto_chunk_size": chunk,
            "tensor_peak_mb": tensor_peak,
            "grows_with_meta_batch": grows_with_meta_batch(impl),
            "tasks_per_s": iters * meta_batch / seconds,
            "seconds_per_meta_batch": seconds / iters, "peak_rss_mb": peak,
            "rss_before_timing_mb": base, "peak_over_base_mb": peak - base,
            "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def grows_with_meta_batch(impl: str) -> bool:
    """Whether an implementation holds every task's graph at once (one vmap, or one backward
    for the meta-batch); the others hold one task's, or one chunk's, whatever the meta-batch."""
    options = IMPLS[impl][0]
    return options is not None and "vmap_chunk_size" not in options and (
        options.get("vmap", False) or options.get("per_task_backward") is False)


def fits_in(budget_mb: float, r: dict) -> str:
    """The largest meta-batch of ``r``'s setting whose tensors fit in ``budget_mb``, from its
    peak at the measured meta-batch (all of it counted as growing with the tasks: a lower
    bound); ``any`` where memory does not grow with the meta-batch."""
    if not r["grows_with_meta_batch"]:
        return "any"
    return f"~{int(budget_mb // (r['tensor_peak_mb'] / r['meta_batch']))}"


def rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so the timed steps' peak is their own
    and not the data loading's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def check_equal_numerics(tasks: int = 4) -> float:
    """Largest |difference| of the float64 meta-gradients of both implementations."""
    from sharebone.data.episodes import Episode

    batch = episodes("random", tasks, 1)[0]
    batch = Episode(batch.support.double(), batch.support_labels, batch.query.double(),
                    batch.query_labels, batch.classes)
    worst = 0.0
    for first_order in (False, True):
        model, _ = sharebone_step(first_order)
        maml, _ = learn2learn_step(first_order)
        model.double()
        maml.double()
        maml.load_state_dict({f"module.{'0.' if k.startswith('backbone.') else '1.'}"
                              f"{k.split('.', 1)[1]}": v for k, v in model.state_dict().items()})
        loss, _ = model.episode_loss(batch)
        loss.backward()
        maml.zero_grad()
        for t in range(tasks):
            learner = maml.clone()
            learner.adapt(F.cross_entropy(learner(batch.support[t]), batch.support_labels[t]))
            (F.cross_entropy(learner(batch.query[t]), batch.query_labels[t]) / tasks).backward()
        for a, b in zip(model.parameters(), maml.parameters(), strict=True):
            worst = max(worst, (a.grad - b.grad).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=["auto", "real", "random"], default="auto")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument("--impls", default="sharebone,learn2learn,learn2learn-keep-freed-memory,"
                                           "sharebone-default-malloc",
                        help=f"comma list of {', '.join(IMPLS)}, learn2learn")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds over all implementations, alternating; the best counts")
    parser.add_argument("--orders", default="2,1")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--settings", default=None,
                        help="comma list of <n>w<k>s<q>q:<meta-batch>, e.g. 5w1s15q:32,20w1s5q:16 "
                             "(default: 5w1s15q at --meta-batch)")
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="settings, implementations, orders, device, iters and warm-up of "
                             "a table; explicit options win")
    parser.add_argument("--hidden", type=int, default=SPEC["hidden"],
                        help="conv4 channels (64 as in the paper; smaller for smoke runs)")
    parser.add_argument("--backbone", choices=list(BACKBONES), default="conv4",
                        help="conv4 (28x28x1), conv4_84 (MAML's miniImageNet net, 84x84x3) or "
                             "resnet12 (84x84x3); random images for all but conv4")
    parser.add_argument("--fit-gb", type=float, default=16.0,
                        help="memory budget of the table's last column, GiB (issue 12: 16)")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "ORDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    given = given_options(parser, sys.argv[1:])
    if args.preset:
        settings, impls, orders, device, iters, warmup = PRESETS[args.preset]
        for key, value in (("settings", settings), ("impls", impls), ("orders", orders),
                           ("device", device), ("iters", iters), ("warmup", warmup)):
            if key not in given:
                setattr(args, key, value)
    args.device = args.device or "cpu"
    if args.backbone != "conv4":
        SPEC.clear()
        SPEC.update(BACKBONES[args.backbone])
        if args.data == "real":
            parser.error("--data real is Omniglot at 28x28: use it with --backbone conv4")
        args.data = "random"
    if "hidden" in SPEC and (args.backbone == "conv4" or "hidden" in given):
        SPEC["hidden"] = args.hidden
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data
    if data == "auto":
        root = os.environ.get("SHAREBONE_DATA_DIR", "data")
        found = os.path.isfile(os.path.join(root, "omniglot", "images_background_small1.zip"))
        data = "real" if found else "random"
    settings = [parse_setting(x) for x in args.settings.split(",")] if args.settings else [
        ((N_WAY, K_SHOT, Q_QUERY), args.meta_batch)]
    if args.worker:
        (SETTING["n_way"], SETTING["k_shot"], SETTING["q_query"]), meta_batch = settings[0]
        result = worker(args.worker[0], int(args.worker[1]), data, meta_batch, args.iters,
                        args.warmup, args.device)
        print("RESULT " + json.dumps(result))
        return

    where = args.device
    if torch.device(where).type == "cuda" and torch.cuda.is_available():
        where += f" ({torch.cuda.get_device_name(torch.device(where))})"
    print(f"torch {torch.__version__}, device {where}, {torch.get_num_threads()} threads, "
          f"data={data}, {describe(SPEC)}, {args.iters} timed meta-batches after "
          f"{args.warmup}")
    difference = check_equal_numerics() if "learn2learn" in args.impls else float("nan")
    print(f"equal numerics: max |meta-gradient difference| (float64, 4 tasks) = {difference:.2e}")
    jobs = [(f"{way}w{shot}s{query}q:{meta_batch}", order, round_, impl)
            for (way, shot, query), meta_batch in settings
            for order in (int(o) for o in args.orders.split(","))
            for round_ in range(args.repeats) for impl in args.impls.split(",")]
    runs = []
    for setting, order, round_, impl in jobs:
        cmd = [sys.executable, __file__, "--worker", impl, str(order), "--data", data,
               "--settings", setting, "--iters", str(args.iters), "--warmup", str(args.warmup),
               "--device", args.device, "--hidden", str(args.hidden), "--backbone", args.backbone]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            print(f"{setting} {impl} order {order} failed:\n{out.stderr[-2000:]}")
            continue
        r = json.loads(line[0][7:])
        runs.append(r)
        print(f"  round {round_} {setting} {impl:22s} order {order}: {r['tasks_per_s']:7.2f} "
              f"tasks/s ({r['seconds_per_meta_batch']:.2f} s/meta-batch), "
              f"peak {r['peak_mb']:.0f} MB", flush=True)
    # The best round of each: on a shared machine the slow rounds measure the neighbours.
    results = []
    for r in runs:
        best = max((x for x in runs if (x["impl"], x["order"], x["setting"])
                    == (r["impl"], r["order"], r["setting"])), key=lambda x: x["tasks_per_s"])
        if best not in results:
            results.append(best)
    cuda = torch.device(args.device).type == "cuda"
    peak = ("peak GPU MB (max_memory_allocated)" if cuda
            else "peak RSS MB | peak tensor MB (PeakMemory)")
    budget = f"meta-batch in {args.fit_gb:g} GiB"
    print(f"\n| setting | order | implementation | tasks/s (best round) | s / meta-batch | {peak} "
          f"| vs learn2learn | tensor memory vs learn2learn | {budget} |")
    print("|---" * (9 if cuda else 10) + "|")
    for r in results:
        ref = next((x for x in results if (x["order"], x["setting"]) == (r["order"], r["setting"])
                    and x["impl"] == "learn2learn"), None)
        ratio = f"{r['tasks_per_s'] / ref['tasks_per_s']:.2f}x" if ref else "-"
        memory = f"{r['tensor_peak_mb'] / ref['tensor_peak_mb']:.2f}x" if ref else "-"
        name = r["impl"] + (f" (k={r['auto_chunk_size']})" if r.get("auto_chunk_size") else "")
        peaks = f"{r['peak_mb']:.0f}" + ("" if cuda else f" | {r['tensor_peak_mb']:.0f}")
        print(f"| {r['setting']} | {r['order']} | {name} | {r['tasks_per_s']:.2f} | "
              f"{r['seconds_per_meta_batch']:.2f} | {peaks} | {ratio} | {memory} | "
              f"{fits_in(args.fit_gb * 1024, r)} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"data": data, "threads": torch.get_num_threads(), "device": where,
                       "settings": args.settings, "grad_difference": difference,
                       "results": results, "runs": runs}, f, indent=2)


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options named on the command line (a preset fills in the others, so an explicit
    ``--warmup 1`` wins over a preset's 3 although 1 is also the default)."""
    flags = {flag: a.dest for a in parser._actions for flag in a.option_strings}
    return {flags[arg.split("=", 1)[0]] for arg in argv if arg.split("=", 1)[0] in flags}


def describe(spec: dict) -> str:
    """``conv4-64 28x28x1``: the backbone as the table's header names it."""
    width = f"-{spec['hidden']}" if "hidden" in spec else ""
    size = spec["image_size"]
    return f"{spec['name']}{width} {size}x{size}x{spec['in_channels']}"


def parse_setting(text: str) -> tuple[tuple[int, int, int], int]:
    """``"5w1s15q:32"`` -> ``((5, 1, 15), 32)``: ways, shots, queries; meta-batch."""
    match = re.fullmatch(r"(\d+)w(\d+)s(\d+)q:(\d+)", text.strip())
    if not match:
        raise SystemExit(f"a setting reads like 5w1s15q:32 (ways, shots, queries: meta-batch), "
                         f"got {text!r}")
    way, shot, query, meta_batch = map(int, match.groups())
    return (way, shot, query), meta_batch


def setting_name(meta_batch: int) -> str:
    return "{n_way}w{k_shot}s{q_query}q".format(**SETTING) + f":{meta_batch}"

if __name__ == "__main__":
    main()
