"""Every experiment preset trains for a few steps and is scored: presets are run, not only
composed. Omniglot presets read the real archives (../shared/data); a clone without them skips
those, saying why."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.configs import compose_train
from helpers.data import SHARED_DATA, make_image_folder, omniglot_zip_bytes, write_archive
from helpers.md_releases import (
    OMNIGLOT_BACKGROUND,
    make_aircraft,
    make_fungi,
    make_quickdraw,
    make_vgg_flower,
)

from sharebone.config import CONFIG_DIR
from sharebone.data import omniglot
from sharebone.run.train import run

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
#: A few steps of any preset: its regime, task, backbone and optimiser, a sliver of its budget.
SHORT = ["logger=csv", "trainer.max_steps=2", "sampler.batches_per_epoch=2",
         "sampler.val_episodes=2", "sampler.meta_batch_size=2", "test.episodes=2"]


#: Meta-Dataset source -> its release's class-folder root under data_dir (tasks/md_*.yaml).
MD_ROOTS = {"ilsvrc_2012": "ILSVRC2012/train", "dtd": "dtd/images",
            "cu_birds": "CUB_200_2011/images"}


def md_names(source: str) -> list[str]:
    """Every class of a source's published split files."""
    folder = CONFIG_DIR / "task" / "splits" / "meta_dataset" / source
    return [line.strip() for s in ("train", "val", "test") if (folder / f"{s}.txt").is_file()
            for line in (folder / f"{s}.txt").read_text().splitlines() if line.strip()]


def meta_dataset_layout(data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                        all_sources: bool) -> Path:
    """``data_dir`` holding a few tiny images of every class of each source's split files,
    each source in its release's layout (with ``all_sources``: md_all's eight)."""
    for source, root in MD_ROOTS.items():
        make_image_folder(data_dir / root, dict.fromkeys(md_names(source), 3), size=(8, 8))
    if not all_sources:
        return data_dir
    make_aircraft(data_dir / "fgvc-aircraft-2013b", dict.fromkeys(md_names("aircraft"), 3))
    make_vgg_flower(data_dir / "vgg_flower",
                    [int(n[:3]) for n in md_names("vgg_flower") for _ in range(3)])
    make_fungi(data_dir / "fungi", {int(n[:4]): (n[5:], 3) for n in md_names("fungi")})
    make_quickdraw(data_dir / "quickdraw", dict.fromkeys(md_names("quickdraw"), 3))
    # The full Omniglot archives, generated: the registry points at them (their md5s).
    for name, alphabets in (("images_background", OMNIGLOT_BACKGROUND),
                            ("images_evaluation", [f"Eval_{i}" for i in range(5)])):
        spec = write_archive(data_dir / "omniglot", name, omniglot_zip_bytes(
            name, dict.fromkeys(alphabets, 5), n_images=3))  # 5: episodes within an alphabet
        monkeypatch.setitem(omniglot.OMNIGLOT_ARCHIVES, name, spec)
    return data_dir


def small_set_stand_ins(cfg) -> list[str]:
    """Overrides pointing every split that reads an Omniglot archive missing from the shared
    data (the full background and evaluation sets a user downloads) at a small-set alphabet
    instead: the preset's training split, regime and budget run as they are; its scores do
    not mean anything here."""
    out = []
    for split, spec in cfg.task.family.splits.items():
        if not all((SHARED_DATA / "omniglot" / f"{a}.zip").is_file() for a in spec.archives):
            out += [f"task.family.splits.{split}.archives=[images_background_small1]",
                    f"task.family.splits.{split}.alphabets=[Balinese]"]
    return out


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_trains_and_scores(experiment, tmp_path, monkeypatch):
    overrides = [f"experiment={experiment}", *SHORT]
    if experiment.startswith("omniglot"):
        if not (SHARED_DATA / "omniglot" / "images_background_small1.zip").is_file():
            pytest.skip(f"real Omniglot archives not found at {SHARED_DATA}/omniglot (the "
                        "project's shared data; CI has it, a user's clone may not)")
        overrides += [f"data_dir={SHARED_DATA}", "test.settings=[{n_way: 5, k_shot: 1}]"]
        overrides += small_set_stand_ins(compose_train(tmp_path, overrides))
    if experiment.startswith("meta_dataset"):
        # Meta-Dataset's sources are not in the shared data (nor downloadable here): the
        # preset runs on generated folders in each source's real layout, every class of the
        # published splits present.
        data_dir = meta_dataset_layout(tmp_path / "data", monkeypatch,
                                       all_sources=experiment == "meta_dataset_all")
        # Episodes of the paper's rules, capped small: a ResNet-12 on 50-way episodes of up
        # to 150 images at 84 px took minutes here.
        overrides += ["sampler.meta_dataset.max_ways=5",
                      "sampler.meta_dataset.max_support_set_size=10",
                      f"data_dir={data_dir}",
                      f"cache_dir={tmp_path / 'cache'}"]
    cfg = compose_train(tmp_path, overrides)
    metrics = run(cfg)
    scores = [v for k, v in metrics.items() if k.startswith("test/") and "ci95" not in k
              and "average/" not in k]
    rows = len(cfg.test.settings) * len(cfg.task.family.get("sources") or [None])
    assert len(scores) == rows and all(v == v for v in scores)  # not NaN
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
