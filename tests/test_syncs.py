"""Training steps read nothing back from the device except on logging steps (issue 12).

On a GPU every host read of a device value (``.item()``, ``bool(t)``, a progress-bar metric)
makes the host wait for the device; one per step stops the host from queueing the next step
while the device works. :class:`sharebone.callbacks.syncs.HostSyncs` counts those reads on any
device,
so these tests hold the training loop to it on a CPU.
"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.configs import compose_train

from sharebone.callbacks.syncs import HostSyncs, SyncCounter
from sharebone.run.train import run

MADE: list[HostSyncs] = []


class Counted(HostSyncs):
    """The counter a run made, found again after the run."""

    def __init__(self) -> None:
        super().__init__()
        MADE.append(self)


def test_the_counter_names_the_line_of_each_read_and_skips_host_step_counts():
    x = torch.ones(3, requires_grad=True)
    optimizer = torch.optim.Adam([x], lr=0.1)  # on a CPU it reads its step count: host-side
    x.sum().backward()
    with SyncCounter() as syncs:
        value = x.sum().item()
        positive = bool((x > 0).all())
        optimizer.step()
        shown = f"{x.sum():.2f}"
    assert value == 3.0 and positive and shown == "2.70"
    assert sum(syncs.counts.values()) == 3, syncs.counts
    # one line each, named by this file and the test
    assert len(syncs.counts) == 3 and all(
        where.startswith("tests/test_syncs.py:") and where.endswith("_step_counts)")
        for where in syncs.counts), syncs.counts
    with SyncCounter(device_only=True) as syncs:  # a GPU run: only device tensors count
        x.sum().item()
    assert not syncs.counts


# 12 training steps, written to the logger every 5: Lightning logs steps 4 and 9, sharebone
# also the epoch's last (11). A bar is drawn at every step.
STEPS, LOGGED = 12, {4, 9, 11}
LOOP = ["task=synthetic_images", "logger=csv", f"sampler.batches_per_epoch={STEPS}",
        "sampler.val_episodes=4", "trainer.max_epochs=1", "trainer.log_every_n_steps=5",
        "test.enabled=false", "figures.enabled=false", "trainer.gradient_clip_val=1.0",
        "nonfinite_check=logging",  # what a GPU run does (auto)
        "callbacks=[default,host_syncs]", "callbacks.progress_bar.every_seconds=0",
        f"callbacks.host_syncs._target_={__name__}.Counted"]


@pytest.mark.parametrize("overrides", [
    ["regime=maml"], ["regime=maml", "regime.vmap=true", "regime.vmap_chunk_size=2"],
    ["regime=fomaml"], ["regime=anil"], ["regime=metasgd"], ["regime=protonet"],
    ["regime=finetune"], ["regime=reptile", "backbone=mlp", "regime.inner_steps=1"],
    ["regime=imaml", "backbone=mlp", "regime.inner_steps=1", "regime.cg_steps=1"],
    ["regime=r2d2", "backbone=mlp"],
], ids=lambda o: "-".join(v.split("=")[1] for v in o))
def test_only_logging_steps_read_values_from_the_device(tmp_path, overrides, caplog):
    with caplog.at_level(logging.INFO, logger="sharebone.callbacks.syncs"):
        run(compose_train(tmp_path, LOOP + overrides + ["sampler.meta_batch_size=4"]))
    counter = MADE.pop()
    assert len(counter.per_step) == STEPS
    silent = [n for step, n in enumerate(counter.per_step) if step not in LOGGED]
    assert silent == [0] * len(silent), (counter.per_step, dict(counter.counts))
    # A logging step reads: the NaN check, the bar's metrics, the logger's values.
    logged = [counter.per_step[step] for step in sorted(LOGGED)]
    assert all(n > 0 for n in logged), counter.per_step
    assert any("guards.py" in where for where in counter.counts)
    assert any("progress.py" in where for where in counter.counts)
    report = "\n".join(r.getMessage() for r in caplog.records
                       if r.name == "sharebone.callbacks.syncs")
    assert f"per training step ({STEPS} steps)" in report
    assert "sharebone/callbacks/guards.py" in report
