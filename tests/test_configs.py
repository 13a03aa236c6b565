"""Every config group option composes and builds; experiments hold overrides only."""

from __future__ import annotations

import pytest
from conftest import compose_train
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sharebone.config import CONFIG_DIR


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["regime", "backbone", "trainer", "logger", "sampler", "task",
                                   "experiment", "debug"])
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
    family = instantiate(cfg.task.family)
    assert family is not None and cfg.task.n_way >= 1


def test_experiments_are_overrides_only():
    for path in (CONFIG_DIR / "experiment").glob("*.yaml"):
        assert path.read_text().startswith("# @package _global_"), path.name
