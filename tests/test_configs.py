"""Every config group option composes and builds; experiments hold overrides only."""

from __future__ import annotations

import pytest
import torch
from helpers.configs import compose_train
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sharebone.config import CONFIG_DIR
from sharebone.data.families import build_family
from sharebone.run.build import build_run


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["regime", "backbone", "trainer", "logger", "sampler", "task",
                                   "experiment", "debug", "optimizer", "scheduler"])
def test_every_option_of_every_group_composes_and_resolves(group, tmp_path):
    assert options(group), f"configs/{group}/ is empty"
    for option in options(group):
        cfg = compose_train(tmp_path, [f"{group}={option}"])
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("regime", options("regime"))
@pytest.mark.parametrize("backbone", ["conv4", "mlp"])
def test_regimes_build_on_every_image_backbone(regime, backbone, tmp_path):
    cfg = compose_train(tmp_path, [f"regime={regime}", f"backbone={backbone}",
                                   "task=synthetic_images"])
    model = instantiate(cfg.regime, _convert_="all")
    sharing = model.parameter_sharing()
    assert sharing.shared > 0


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_configs_target_lightning(trainer, tmp_path):
    cfg = compose_train(tmp_path, [f"trainer={trainer}"])
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    assert cfg.trainer.inference_mode is False and cfg.trainer.use_distributed_sampler is False


@pytest.mark.parametrize("task", options("task"))
def test_task_families_build_without_touching_data(task, tmp_path):
    cfg = compose_train(tmp_path, [f"task={task}"])
    family = build_family(cfg.task.family)
    assert family is not None and cfg.task.n_way >= 1


def test_experiments_are_overrides_only():
    for path in (CONFIG_DIR / "experiment").glob("*.yaml"):
        assert path.read_text().startswith("# @package _global_"), path.name


@pytest.mark.parametrize("optimizer", options("optimizer"))
@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_optimizer_and_scheduler_come_from_config(optimizer, scheduler, tmp_path):
    cfg = compose_train(tmp_path, ["task=synthetic_images", f"optimizer={optimizer}",
                                   f"scheduler={scheduler}", "regime.lr=0.02"])
    config = build_run(cfg).regime.configure_optimizers()
    assert type(config["optimizer"]).__name__.lower() == optimizer
    assert config["optimizer"].param_groups[0]["lr"] == pytest.approx(0.02)
    assert config["lr_scheduler"]["interval"] == "step"
    expected = {"step": "StepLR", "cosine": "CosineAnnealingLR"}[scheduler]
    assert type(config["lr_scheduler"]["scheduler"]).__name__ == expected


@pytest.mark.parametrize(("regime", "schedule"), [("protonet", "StepLR"), ("maml", None),
                                                  ("pretrain", None)])
def test_by_default_each_regime_keeps_its_papers_optimiser(regime, schedule, tmp_path):
    cfg = compose_train(tmp_path, ["task=synthetic_images", f"regime={regime}"])
    config = build_run(cfg).regime.configure_optimizers()
    optimizer = config["optimizer"] if isinstance(config, dict) else config
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == cfg.regime.lr
    assert optimizer.param_groups[0]["weight_decay"] == cfg.regime.get("weight_decay", 0.0)
    scheduler = config["lr_scheduler"]["scheduler"] if isinstance(config, dict) else None
    assert type(scheduler).__name__ == schedule if schedule else scheduler is None


def test_an_optimizer_config_that_is_not_partial_is_refused(tmp_path):
    cfg = compose_train(tmp_path, ["task=synthetic_images", "~optimizer._partial_"])
    with pytest.raises(ValueError, match="optimizer: set _partial_: true"):
        build_run(cfg)


@pytest.mark.parametrize("regime", ["maml", "multitask", "finetune"])
def test_every_regime_takes_its_optimizer_from_config(regime, tmp_path):
    task = "synthetic_regression" if regime == "multitask" else "synthetic_images"
    extra = ["regime.loss=mse", "backbone=mlp"] if regime == "multitask" else []
    cfg = compose_train(tmp_path, [f"task={task}", f"regime={regime}", "optimizer=sgd", *extra])
    optimizer = build_run(cfg).regime.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
