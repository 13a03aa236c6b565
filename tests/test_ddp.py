"""DDP on CPU (2 gloo processes): each rank its share of every meta-batch, one run directory.

ProtoNet runs in the default suite, MAML (second order) among the slow tests. The launch
through the command line (``strategy=ddp``, ranks re-run the script) is covered in
tests/test_sweeps.py, where a 2-job multirun runs under it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers.configs import FAST, compose_train

from sharebone.data.families import build_family
from sharebone.data.variable import episode_source
from sharebone.run.train import launch_rank, run

META_BATCH, BATCHES, EPOCHS = 4, 8, 2


class EpisodeRecorder(pl.Callback):
    """Writes the classes of every training episode a rank drew to ``episodes_rank<r>.json``."""

    def __init__(self, folder: str) -> None:
        self.folder, self.seen = folder, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append({"epoch": trainer.current_epoch, "batch": batch_idx,
                          "classes": batch.classes.tolist()})

    def on_train_end(self, trainer, pl_module) -> None:
        path = Path(self.folder) / f"episodes_rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"world_size": trainer.world_size, "seen": self.seen}))


def ddp_overrides(tmp_path: Path, regime: str = "protonet") -> list[str]:
    return [o for o in FAST if not o.startswith("logger=")] + [
        "trainer=ddp_cpu", "logger=wandb", "+logger.csv={}", f"regime={regime}",
        f"sampler.meta_batch_size={META_BATCH}", f"sampler.batches_per_epoch={BATCHES}",
        # 40 test episodes: with 8, the 95% CI (~0.09) was so wide that MAML's 44% after 16
        # meta-batches (chance 20%) missed "3 CIs above chance"; scoring them costs little.
        f"trainer.max_epochs={EPOCHS}", "test.episodes=40", "test.settings=[{n_way: 5, k_shot: 1}]",
        f"+callbacks.recorder._target_={__name__}.EpisodeRecorder",
        f"+callbacks.recorder.folder={tmp_path}",
    ]


@pytest.fixture(scope="module", params=[
    "protonet", pytest.param("maml", marks=pytest.mark.slow)])
def trained_ddp(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"ddp_{request.param}")
    cfg = compose_train(out, ddp_overrides(out, request.param) + ["regime.lr=0.003"])
    metrics = run(cfg)
    return out, cfg, metrics


def train_losses(out: Path) -> list[float]:
    rows = csv.DictReader((out / "csv" / "metrics.csv").open())
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_regime_under_ddp_learns_and_scores_on_rank_zero(trained_ddp):
    out, _, metrics = trained_ddp
    losses = train_losses(out)
    assert len(losses) == BATCHES * EPOCHS
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    assert metrics["test/5w1s/acc"] > 0.2 + 3 * metrics["test/5w1s/ci95"] and "val/acc" in metrics
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test/5w1s/acc"] == metrics["test/5w1s/acc"]
    assert (out / "fewshot.json").is_file()


def test_one_run_directory_and_checkpoints_from_rank_zero(trained_ddp):
    out, _, _ = trained_ddp
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert not list(out.rglob("lightning_logs")) and not list(out.rglob("version_*"))
    assert not (out / ".rank_config.yaml").exists()
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1  # one W&B run, not one per rank
    raw = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert raw["global_step"] == BATCHES * EPOCHS


def test_ranks_draw_disjoint_shares_of_the_episodes_one_process_would(trained_ddp):
    out, cfg, _ = trained_ddp
    ranks = [json.loads((out / f"episodes_rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    family = build_family(cfg.task.family)
    s = cfg.sampler
    source = episode_source(family, "train", s.seed, dict(s.train))  # as the data module does
    share = META_BATCH // 2
    for rank, record in enumerate(ranks):
        assert len(record["seen"]) == BATCHES * EPOCHS
        for step in record["seen"]:
            b = step["epoch"] * BATCHES + step["batch"]
            whole = source.batch(range(b * META_BATCH, (b + 1) * META_BATCH)).classes
            assert step["classes"] == whole[rank * share:(rank + 1) * share].tolist()
    episodes = [{tuple(c) for step in r["seen"] for c in step["classes"]} for r in ranks]
    assert episodes[0].isdisjoint(episodes[1])


@pytest.mark.parametrize("env, rank", [
    ({}, 0), ({"LOCAL_RANK": "1"}, 1), ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, 1),
    ({"SLURM_PROCID": "3"}, 3), ({"RANK": "0", "LOCAL_RANK": "2"}, 0)])
def test_launch_rank_before_the_trainer_exists(monkeypatch, env, rank):
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK", "NODE_RANK",
                "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert (launch_rank() == 0) == (rank == 0)
