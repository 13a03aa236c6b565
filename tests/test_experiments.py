"""Every experiment preset trains for a few steps and is scored: presets are run, not only
composed. Omniglot presets read the real archives (../shared/data); a clone without them skips
those, saying why."""

from __future__ import annotations

import pytest
from helpers.configs import compose_train
from helpers.data import SHARED_DATA

from sharebone.config import CONFIG_DIR
from sharebone.run.train import run

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
#: A few steps of any preset: its regime, task, backbone and optimiser, a sliver of its budget.
SHORT = ["logger=csv", "trainer.max_steps=2", "sampler.batches_per_epoch=2",
         "sampler.val_episodes=2", "sampler.meta_batch_size=2", "test.episodes=2"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_trains_and_scores(experiment, tmp_path):
    overrides = [f"experiment={experiment}", *SHORT]
    if experiment.startswith("omniglot"):
        if not (SHARED_DATA / "omniglot" / "images_background_small1.zip").is_file():
            pytest.skip(f"real Omniglot archives not found at {SHARED_DATA}/omniglot (the "
                        "project's shared data; CI has it, a user's clone may not)")
        overrides += [f"data_dir={SHARED_DATA}", "test.settings=[{n_way: 5, k_shot: 1}]"]
    if experiment.startswith("meta_dataset"):
        # Meta-Dataset's sources (ILSVRC-2012's 1,000 class folders...) are not in the
        # shared data; their loader is tested on a generated layout (test_variable_episodes).
        root = SHARED_DATA / "ILSVRC2012" / "train"
        if not root.is_dir():
            pytest.skip(f"Meta-Dataset's ILSVRC-2012 class folders not found at {root}")
        overrides += [f"data_dir={SHARED_DATA}"]
    cfg = compose_train(tmp_path, overrides)
    metrics = run(cfg)
    scores = [v for k, v in metrics.items() if k.startswith("test/") and "ci95" not in k
              and "average/" not in k]
    rows = len(cfg.test.settings) * len(cfg.task.family.get("sources") or [None])
    assert len(scores) == rows and all(v == v for v in scores)  # not NaN
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
