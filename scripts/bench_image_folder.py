"""Image folders: decode throughput, cache size, episode throughput and memory of sampling.

Generates a folder of ``--images`` JPEGs (``--classes`` class folders) of each
``--source-size`` (default: 84x84, a pre-resized miniImageNet, and 500x375, ImageNet-like
photos), then measures:

1. **decode**: :class:`~sharebone.data.image_folder.ImageFolderTasks` decoding the whole folder
   into its 84x84x3 uint8 cache (``.npy``), with 1 and with all (``os.sched_getaffinity``)
   decoding threads: images/s, wall time, cache size on disk. Each run uses a fresh cache dir.
2. **episodes**: 5-way 5-shot 15-query meta-batches of 32 from the memory-mapped cache
   (``EpisodeSampler.batch``: counter-based hash, one ``index_select`` each for support and
   query into huge-page memory), episodes/s; the same with augmentation and normalisation on
   the CPU (``sampler.prepare``: crop with padding, colour jitter, flip, normalise; what
   ``on_after_batch_transfer`` does on the device); and learn2learn's ``TaskDataset`` (one
   task per call, as scripts/bench_sampler.py times it) on the same tensor, when learn2learn
   is installed. Beside them, the memory-bandwidth **ceiling**: the same bytes (3,200 random
   rows of 21 KB, 68 MB per meta-batch) gathered by one plain ``torch.index_select`` from the
   cache into a buffer reused every call (pages already mapped: the copy alone), one into a
   fresh buffer (``torch.index_select`` as is: every 4 KiB page faulted in and zeroed by the
   kernel first), and one contiguous 68 MB ``copy_`` (memcpy); the sampler is reported as a
   fraction of the first.
3. **memory**: resident memory of a fresh process that loads the cache and samples
   ``--rss-batches`` meta-batches, memory-mapped (sharebone's way) vs the same array read
   into RAM (``np.load`` without ``mmap_mode``): VmRSS, RssAnon (private memory) and RssFile
   (pages of the mapped cache, shared with every other process and reclaimable), next to the
   cache's size.

Usage:
    .venv/bin/python scripts/bench_image_folder.py [--images 10000] [--json out.json]
    .venv/bin/python scripts/bench_image_folder.py --images 200 --quick   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

from bench_sampler import import_l2l, l2l_calls, measure  # noqa: E402

from sharebone.data.episodes import EpisodeSampler  # noqa: E402
from sharebone.data.image_folder import ImageFolderTasks  # noqa: E402

N_WAY, K_SHOT, Q_QUERY, META_BATCH = 5, 5, 15, 32
AUGMENT = {"random_crop": {"padding": 8}, "horizontal_flip": 0.5,
           "color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4}}
NORMALIZE = {"mean": [0.472, 0.453, 0.410], "std": [0.277, 0.268, 0.284]}


def generate(root: Path, images: int, classes: int, size: tuple[int, int]) -> float:
    """``images`` JPEGs in ``classes`` folders, photo-like (smooth, with some noise, so JPEG
    sizes are realistic); returns seconds taken."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    per_class = images // classes
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
            noise = rng.integers(-12, 12, (size[1], size[0], 3))
            pixels = (np.asarray(img, np.int16) + noise).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"n{c:08d}{i:08d}.jpg", quality=90)
    return time.perf_counter() - start


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def decode(root: Path, cache: Path, workers: int) -> dict[str, Any]:
    shutil.rmtree(cache, ignore_errors=True)
    family = ImageFolderTasks(str(root), splits={"train": 1.0}, image_size=84, channels=3,
                              cache_dir=str(cache), workers=workers)
    start = time.perf_counter()
    data = family.images("train")
    seconds = time.perf_counter() - start
    (npy,) = (cache / "image_folder").glob("*.npy")
    return {"workers": workers, "images": len(data), "seconds": seconds,
            "images_per_s": len(data) / seconds, "cache_bytes": npy.stat().st_size,
            "cache_file": str(npy)}


def episodes(root: Path, cache: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    family = ImageFolderTasks(str(root), splits={"train": 1.0}, image_size=84, channels=3,
                              cache_dir=str(cache), augment={"train": AUGMENT},
                              normalize=NORMALIZE)
    sampler = family.sampler("train", N_WAY, K_SHOT, Q_QUERY, seed=0)
    data = family.images("train")
    rows = []

    def batch(i: int):
        return sampler.batch(range(i * META_BATCH, (i + 1) * META_BATCH))

    m = measure(batch, META_BATCH, args.seconds, args.repeats, args.warmup)
    rows.append({"what": f"sharebone EpisodeSampler, meta-batch {META_BATCH}, uint8", **m})
    m = measure(lambda i: sampler.prepare(batch(i)), META_BATCH, args.seconds, args.repeats,
                args.warmup)
    rows.append({"what": f"... + augmentation and normalisation on the CPU "
                         f"({torch.get_num_threads()} threads)", **m})
    plain = EpisodeSampler(data.images, data.labels, N_WAY, K_SHOT, Q_QUERY, seed=0)
    m = measure(lambda i: plain.batch(range(i * META_BATCH, (i + 1) * META_BATCH)).to_float(),
                META_BATCH, args.seconds, args.repeats, args.warmup)
    rows.append({"what": "... + to float only (no augmentation)", **m})
    n = META_BATCH * N_WAY * (K_SHOT + Q_QUERY)
    gen = torch.Generator().manual_seed(0)
    picks = [torch.randint(0, len(data), (n,), generator=gen) for _ in range(64)]
    out = torch.empty((n, *data.images.shape[1:]), dtype=torch.uint8)
    m = measure(lambda i: torch.index_select(data.images, 0, picks[i % 64], out=out),
                META_BATCH, args.seconds, args.repeats, args.warmup)
    rows_ceiling = {"what": "ceiling: torch.index_select of the same bytes into a reused "
                            "buffer (the copy alone)", **m}
    m = measure(lambda i: data.images.index_select(0, picks[i % 64]), META_BATCH, args.seconds,
                args.repeats, args.warmup)
    rows_fresh = {"what": "torch.index_select of the same bytes into fresh memory (4 KiB "
                          "pages faulted in)", **m}
    ram = data.images.index_select(0, torch.arange(n) % len(data))  # n contiguous rows
    m = measure(lambda i: out.copy_(ram), META_BATCH, args.seconds, args.repeats, args.warmup)
    rows_memcpy = {"what": "one contiguous copy_ of the same bytes (memcpy)", **m}
    rows += [rows_ceiling, rows_fresh, rows_memcpy]
    l2l = None if args.no_l2l else import_l2l()
    if l2l is not None:
        m = measure(l2l_calls(l2l, data.images, data.labels, N_WAY, K_SHOT, Q_QUERY), 1,
                    args.seconds, args.repeats, args.warmup)
        rows.append({"what": "learn2learn TaskDataset, 1 task, uint8", **m})
    return rows


RSS_CHILD = r"""
import json, sys, numpy as np, torch, warnings
from sharebone.data.episodes import EpisodeSampler
from sharebone.data.image_folder import ImageFolderTasks
mode, root, cache, batches = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out
before = status()
family = ImageFolderTasks(root, splits={"train": 1.0}, image_size=84, channels=3, cache_dir=cache)
data = family.images("train")
images = data.images
if mode == "ram":
    (npy,) = __import__("pathlib").Path(cache, "image_folder").glob("*.npy")
    images = torch.from_numpy(np.load(npy))
sampler = EpisodeSampler(images, data.labels, 5, 5, 15, seed=0)
for b in range(batches):
    sampler.batch(range(b * 32, (b + 1) * 32))
print(json.dumps({"before": before, "after": status()}))
"""


def rss(root: Path, cache: Path, batches: int) -> list[dict[str, Any]]:
    out = []
    env = dict(os.environ)
    for mode in ("mmap", "ram"):
        result = subprocess.run([sys.executable, "-c", RSS_CHILD, mode, str(root), str(cache),
                                 str(batches)], capture_output=True, text=True, env=env,
                                check=True)
        out.append({"mode": mode, **json.loads(result.stdout.strip().splitlines()[-1])})
    return out


def mb(x: float) -> str:
    return f"{x / 1e6:,.0f} MB"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None, help="where to generate the folders (default: a "
                   "temporary folder, removed at the end)")
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--source-size", action="append", default=None,
                   help="WxH of the generated JPEGs (repeatable; default 84x84 and 500x375)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for sampling")
    p.add_argument("--seconds", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=float, default=0.3)
    p.add_argument("--rss-batches", type=int, default=300)
    p.add_argument("--no-l2l", action="store_true")
    p.add_argument("--no-rss", action="store_true", help="skip the memory measurement")
    p.add_argument("--quick", action="store_true", help="tiny timings (checks it runs)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.repeats, args.rss_batches = 0.05, 0.01, 1, 5
    sizes = [tuple(int(v) for v in s.split("x")) for s in (args.source_size
                                                            or ["84x84", "500x375"])]
    torch.set_num_threads(args.threads)
    base = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="sharebone-bench-"))
    cpus = len(os.sched_getaffinity(0))
    result: dict[str, Any] = {"meta": {
        "torch": torch.__version__, "python": platform.python_version(), "cpus": cpus,
        "images": args.images, "classes": args.classes, "loadavg_start": os.getloadavg()},
        "decode": [], "episodes": [], "rss": []}
    try:
        for w, h in sizes:
            root = base / f"folder_{w}x{h}"
            if not root.exists():
                print(f"generating {args.images} {w}x{h} JPEGs in {root} ...", flush=True)
                generate(root, args.images, args.classes, (w, h))
            src = folder_bytes(root)
            for workers in sorted({1, cpus}):
                r = decode(root, base / f"cache_{w}x{h}", workers)
                r.update(source=f"{w}x{h} JPEG", source_bytes=src)
                result["decode"].append(r)
                print(f"decode {w}x{h} JPEG -> 84x84x3, {workers} thread(s): "
                      f"{r['images_per_s']:,.0f} images/s ({r['seconds']:.1f} s); cache "
                      f"{mb(r['cache_bytes'])} (folder {mb(src)})", flush=True)
        cache = base / f"cache_{sizes[0][0]}x{sizes[0][1]}"
        root = base / f"folder_{sizes[0][0]}x{sizes[0][1]}"
        for r in episodes(root, cache, args):
            result["episodes"].append(r)
            print(f"{r['what']}: {r['episodes_per_s']:,.0f} episodes/s "
                  f"(runs {' / '.join(f'{x:,.0f}' for x in r['runs_episodes_per_s'])})",
                  flush=True)
        cache_bytes = result["decode"][0]["cache_bytes"]
        for r in ([] if args.no_rss else rss(root, cache, args.rss_batches)):
            result["rss"].append(r)
            a, b = r["after"], r["before"]
            anon = a["RssAnon"] - b["RssAnon"]
            print(f"RSS after {args.rss_batches} meta-batches, cache {r['mode']}: VmRSS "
                  f"{mb(a['VmRSS'])}, RssAnon {mb(a['RssAnon'])} (+{mb(anon)} since imports), "
                  f"RssFile {mb(a['RssFile'])} "
                  f"(+{mb(a['RssFile'] - b['RssFile'])}); cache file {mb(cache_bytes)}",
                  flush=True)
    finally:
        if not args.root:
            shutil.rmtree(base, ignore_errors=True)
    result["meta"]["loadavg_end"] = os.getloadavg()
    ours = result["episodes"][0]["episodes_per_s"] if result["episodes"] else None
    ceiling = [r for r in result["episodes"] if r["what"].startswith("ceiling")]
    if ours and ceiling:
        top = ceiling[0]["episodes_per_s"]
        result["sampler_over_ceiling"] = ours / top
        print(f"sharebone sampler / ceiling: {ours / top:.2f}", flush=True)
    ratio = [r for r in result["episodes"] if r["what"].startswith("learn2learn")]
    if ours and ratio:
        l2l = ratio[0]["episodes_per_s"]
        result["sampler_over_l2l"] = ours / l2l
        print(f"sharebone / learn2learn: {ours / l2l:.1f}x"
              + (f" (the ceiling over learn2learn: {ceiling[0]['episodes_per_s'] / l2l:.1f}x)"
                 if ceiling else ""), flush=True)
    print(f"load average start {result['meta']['loadavg_start']}, end "
          f"{result['meta']['loadavg_end']}; median of {args.repeats} runs", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
