"""Episodes drawn where the images are: a sampler moved to a device draws the same episodes
there; the datamodule decides by size and settings; a run reports its time in the loader."""

from __future__ import annotations

import csv

import pytest
import torch
from helpers.configs import FAST, compose_train

from sharebone.data.episodes import EpisodeSampler
from sharebone.data.placement import AUTO_FRACTION, check_policy, place_source

META = torch.device("meta")  # a device without memory: placement logic, no GPU needed


def sampler(group_episodes: bool = False) -> EpisodeSampler:
    images = torch.randint(0, 256, (120, 1, 4, 4), dtype=torch.uint8)
    labels = torch.arange(120) // 10  # 12 classes, unequal counts below
    labels[-3:] = 10
    return EpisodeSampler(images, labels, n_way=3, k_shot=2, q_query=2, seed=3,
                          groups=[c // 4 for c in range(12)], group_episodes=group_episodes)


@pytest.mark.parametrize("group_episodes", [False, True])
def test_a_moved_sampler_draws_the_same_episodes_and_leaves_the_original(group_episodes):
    original = sampler(group_episodes)
    moved = original.to(META)
    assert moved is not original and moved.device == META and original.device.type == "cpu"
    drawn = moved.batch(range(5, 13))
    assert drawn.support.device == META and drawn.classes.device == META
    assert drawn.index.device.type == "cpu"  # seeds augmentation: stays on the host
    assert drawn.support.shape == original.batch(range(5, 13)).support.shape
    again = original.to("cpu").batch(range(5, 13))
    reference = original.batch(range(5, 13))
    for a, b in zip(again._tensors(), reference._tensors(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("group_episodes", [False, True])
def test_episodes_drawn_on_the_gpu_equal_the_hosts(group_episodes):
    host = sampler(group_episodes)
    on_gpu = host.to("cuda").batch(range(100))
    for a, b in zip(on_gpu.to("cpu")._tensors(), host.batch(range(100))._tensors(),
                    strict=True):
        assert torch.equal(a, b)


def test_auto_moves_a_split_that_fits_a_quarter_of_free_memory():
    source = sampler()
    fits = int(source.nbytes / AUTO_FRACTION)
    assert place_source(source, META, "auto", free_bytes=fits).device == META
    assert place_source(source, META, "auto", free_bytes=fits - 1) is source
    assert place_source(source, META, False, free_bytes=10 * fits) is source
    assert place_source(source, torch.device("cpu"), True) is source  # the host already


def test_true_moves_what_fits_and_says_why_when_it_does_not():
    source = sampler()
    assert place_source(source, META, True, free_bytes=source.nbytes).device == META
    with pytest.warns(UserWarning, match=r"do not fit in the .* episodes are drawn on the host"):
        assert place_source(source, META, True, free_bytes=source.nbytes - 1) is source


def test_worker_processes_keep_auto_on_the_host_and_refuse_true():
    source = sampler()
    assert place_source(source, META, "auto", num_workers=2, free_bytes=2**40) is source
    with pytest.raises(ValueError, match="sampler.num_workers=2.*Set sampler.num_workers=0"):
        place_source(source, META, True, num_workers=2, free_bytes=2**40)


def test_sources_that_generate_their_episodes_are_left_alone():
    class Generated:  # the sinusoid's kind: nothing stored, nothing to move
        def batch(self, indices):
            raise AssertionError("not drawn here")

    generated = Generated()
    assert place_source(generated, META, True, free_bytes=2**40) is generated


@pytest.mark.parametrize("bad", ["gpu", 1, 0.5, None])
def test_a_bad_setting_names_the_key_and_the_choices(bad):
    with pytest.raises(ValueError, match="sampler.images_on_device must be auto, true or false"):
        check_policy(bad)
    assert check_policy("TRUE") is True and check_policy("false") is False


def test_a_run_logs_where_its_step_time_goes(tmp_path):
    from sharebone.run.train import run

    run(compose_train(tmp_path, [*FAST, "logger=csv", "test.episodes=2",
                                 "test.settings=[{n_way: 5, k_shot: 1}]"]))
    (metrics,) = tmp_path.glob("csv/**/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("perf/data_ms")]
    assert rows, "no perf/ row in the CSV log"
    data_ms, step_ms = float(rows[-1]["perf/data_ms"]), float(rows[-1]["perf/step_ms"])
    assert data_ms > 0 and step_ms > 0
    assert float(rows[-1]["perf/data_fraction"]) == pytest.approx(data_ms / (data_ms + step_ms))
