"""The real Omniglot small sets through the real loading code and the default task file."""

from __future__ import annotations

import pytest
import torch
from helpers.configs import compose_train

from sharebone.data.families import build_family
from sharebone.run.train import run

pytestmark = pytest.mark.shared_data


def test_omniglot_small_splits_hold_out_whole_alphabets(real_data_dir, tmp_path):
    cfg = compose_train(tmp_path, ["task=omniglot_small", f"data_dir={real_data_dir}"])
    family = build_family(cfg.task.family)
    train, val, test = (family.images(s) for s in ("train", "val", "test"))
    assert (train.n_classes, val.n_classes, test.n_classes) == (121 * 4, 39, 82)
    alphabets = [{name.split("/")[0] for name in split.class_names} for split in (train, val, test)]
    assert alphabets[2] == {"Korean", "Sanskrit"} and alphabets[1] == {"Early_Aramaic", "Tagalog"}
    assert not (alphabets[0] & alphabets[1]) and not (alphabets[0] & alphabets[2])
    # The 20-way 5-shot 15-query test episode the benchmarks use is possible.
    episode = family.sampler("test", n_way=20, k_shot=5, q_query=15, seed=0).batch([0])
    assert episode.query.shape == (1, 300, 1, 28, 28) and episode.support.dtype == torch.uint8


def test_protonet_trains_on_real_omniglot_and_beats_chance(real_data_dir, tmp_path):
    cfg = compose_train(tmp_path, ["debug=fast", f"data_dir={real_data_dir}", "logger=csv",
                                   "sampler.batches_per_epoch=30", "sampler.train.n_way=20",
                                   "sampler.train.q_query=5", "test.episodes=50",
                                   "test.settings=[{n_way: 5, k_shot: 1}]"])
    metrics = run(cfg)
    # 30 steps already separate unseen alphabets' characters far above chance (20%).
    assert metrics["test/5w1s/acc"] > 0.5
