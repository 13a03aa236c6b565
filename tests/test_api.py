"""The Python API for a training loop of one's own: ``from sharebone import ...``, regimes on a
backbone given as an ``nn.Module``, uint8 episodes straight from a sampler, checkpoints of
such regimes."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

import sharebone
from sharebone import EpisodeSampler, create_regime, load_regime
from sharebone.checkpoint_io import CheckpointError
from sharebone.data.tasks import MetaBatches
from sharebone.regimes import REGIMES, FineTune


class TinyConv(nn.Module):
    """A user's own backbone: conv, batch norm, ReLU, pooled to ``num_features``."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width)
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x))).mean((2, 3))


def uint8_sampler(n_way: int = 3, seed: int = 0) -> EpisodeSampler:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (60, 1, 8, 8), generator=g, dtype=torch.uint8)
    return EpisodeSampler(images, torch.arange(60) // 6, n_way, k_shot=1, q_query=2, seed=seed)


def regime_kwargs(name: str) -> dict:
    return {"n_way": 3} if name in ("maml", "fomaml", "anil", "metasgd", "reptile", "imaml") else {}


# -- the public surface -------------------------------------------------------------------------
def test_import_sharebone_loads_lightning_only_when_a_regime_is_touched():
    code = ("import sys, sharebone\n"
            "assert 'torch' not in sys.modules\n"
            "sharebone.EpisodeSampler, sharebone.adapt, sharebone.accuracy\n"
            "assert 'pytorch_lightning' not in sys.modules\n"
            "sharebone.create_regime\n"
            "assert 'pytorch_lightning' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_public_name_is_the_object_its_module_defines():
    from sharebone import adaptation, task_kind
    from sharebone.data import episodes
    from sharebone.models import backbones
    from sharebone.regimes import base, loading

    homes = {"Episode": episodes, "EpisodeSampler": episodes, "FewShotRegime": base,
             "accuracy": task_kind, "adapt": adaptation, "create_backbone": backbones,
             "create_regime": base, "load_regime": loading}
    assert sorted(homes) == sharebone.__all__
    for name, module in homes.items():
        assert getattr(sharebone, name) is getattr(module, name)
    assert set(sharebone.__all__) <= set(dir(sharebone))
    with pytest.raises(AttributeError, match="no attribute 'MAMl'"):
        sharebone.MAMl  # noqa: B018


# -- a backbone given as a module ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["maml", "fomaml", "anil", "metasgd", "protonet", "reptile",
                                  "imaml", "r2d2"])
def test_episodic_regimes_train_a_module_backbone_with_a_lightning_trainer(name, tmp_path):
    torch.manual_seed(0)
    backbone = TinyConv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Lightning's "nn.Module in hparams" warning
        model = create_regime(name, backbone=backbone, **regime_kwargs(name))
    assert model.backbone is backbone  # used as given, not copied
    assert model.hparams.backbone == {"module": f"{__name__}.TinyConv", "num_features": 6}
    before = [p.detach().clone() for p in backbone.parameters()]
    # uint8 meta-batches straight from the sampler: no data module converts them.
    train = DataLoader(MetaBatches(uint8_sampler(), 2, 2), batch_size=None)
    val = DataLoader(MetaBatches(uint8_sampler(seed=1), 2, 1), batch_size=None)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         inference_mode=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val)
    assert trainer.global_step == 2
    assert 0 <= trainer.callback_metrics["val/acc"] <= 1  # validated on uint8 episodes too
    changed = [not torch.equal(a, p) for a, p in zip(before, backbone.parameters(), strict=True)]
    assert all(changed)  # every backbone parameter was trained


def test_maml_on_a_module_runs_the_same_inner_loop_as_on_the_registry_spec():
    spec = {"name": "mlp", "in_features": 64, "hidden": [8]}
    torch.manual_seed(0)
    from_spec = create_regime("maml", backbone=spec, n_way=3, inner_steps=2)
    own = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU())
    own.num_features = 8
    own[1].load_state_dict(from_spec.backbone.layers[0].state_dict())
    from_module = create_regime("maml", backbone=own, n_way=3, inner_steps=2)
    from_module.head.load_state_dict(from_spec.head.state_dict())
    episode = uint8_sampler().batch([0, 1])
    losses = []
    for model in (from_spec, from_module):
        loss, _ = model.episode_loss(episode)  # second order, through the inner loop
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1])
    pairs = [(from_spec.backbone.layers[0].weight, own[1].weight),
             (from_spec.head.weight, from_module.head.weight)]
    for a, b in pairs:
        assert a.grad is not None and torch.allclose(a.grad, b.grad, atol=1e-6)


def test_maml_vmapped_on_a_module_with_batch_norm_matches_the_loop():
    episode = uint8_sampler().batch([0, 1, 2])
    losses = []
    for vmap in (False, True):
        torch.manual_seed(0)
        model = create_regime("maml", backbone=TinyConv(), n_way=3, vmap=vmap)
        losses.append(model.episode_loss(episode)[0].detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-6)


def test_a_module_without_num_features_is_refused_where_a_head_needs_it():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8))
    with pytest.raises(ValueError, match=r"no positive int `num_features`.*num_features = 64"):
        create_regime("maml", backbone=net, n_way=3)
    with pytest.raises(ValueError, match="num_features"):
        create_regime("pretrain", backbone=net, num_classes=4)
    # ProtoNet puts no head on it: any x -> features network will do.
    protonet = create_regime("protonet", backbone=net)
    assert protonet.predict_episode(uint8_sampler().batch([0])).shape == (1, 6, 3)
    with pytest.raises(ValueError, match=r"single episode .* sampler.batch\(\[i\]\) instead"):
        protonet.predict_episode(uint8_sampler()[0])


@pytest.mark.parametrize("backbone, match", [
    ([1, 2], "got list"),
    ({"hidden": 64}, r"a mapping without 'name' \(keys: \['hidden'\]\)"),
    (nn.Linear, "got type"),
])
def test_a_backbone_that_is_neither_a_module_nor_a_spec_is_refused(backbone, match):
    with pytest.raises(TypeError, match=rf"nn.Module .* or a registry spec .*{match}"):
        create_regime("protonet", backbone=backbone)


# -- uint8 episodes -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", REGIMES.names())
def test_every_regime_takes_uint8_episodes_as_their_float_form(name):
    torch.manual_seed(0)
    model = create_regime(name, backbone=TinyConv(), **regime_kwargs(name)).eval()
    episode = uint8_sampler().batch([0, 1])
    with model.prediction_context():
        raw = model.predict_episode(episode)
        floats = model.predict_episode(episode.to_float())
        loss_raw, _ = model.episode_loss(episode)
        loss_float, _ = model.episode_loss(episode.to_float())
    assert raw.dtype == torch.float32 and torch.allclose(raw, floats, atol=1e-5)
    assert torch.allclose(loss_raw, loss_float, atol=1e-5)


# -- checkpoints --------------------------------------------------------------------------------
@pytest.fixture
def module_checkpoint(tmp_path):
    """A ProtoNet trained one step on a TinyConv, saved by Lightning."""
    torch.manual_seed(0)
    model = create_regime("protonet", backbone=TinyConv())
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, accelerator="cpu", default_root_dir=tmp_path)
    episodes = DataLoader(MetaBatches(uint8_sampler(), 2, 1), batch_size=None)
    trainer.fit(model, train_dataloaders=episodes, val_dataloaders=episodes)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return model, path


def test_a_module_backbone_checkpoint_loads_into_a_new_module(module_checkpoint):
    model, path = module_checkpoint
    with pytest.raises(CheckpointError, match=r"given as a module \(test_api.TinyConv\).*"
                                              r"load_regime\(path, backbone=TinyConv\(\.\.\.\)\)"):
        load_regime(path)
    loaded = load_regime(path, backbone=TinyConv())
    episode = uint8_sampler().batch([3])
    with torch.no_grad():
        assert torch.equal(loaded.eval().predict_episode(episode),
                           model.eval().predict_episode(episode))
    with pytest.raises(CheckpointError, match=r"do not fit a protonet model with the TinyConv "
                                              r"given as its backbone"):
        load_regime(path, backbone=TinyConv(width=5))


def test_finetune_from_a_module_backbone_checkpoint_needs_the_module(module_checkpoint):
    model, path = module_checkpoint
    with pytest.raises(CheckpointError, match=r"given as a module .* pass backbone="):
        FineTune(source=str(path), num_classes=3)
    fresh = TinyConv()
    tuned = FineTune(source=str(path), backbone=fresh, num_classes=3)
    tuned.setup("fit")
    assert torch.equal(fresh.conv.weight, model.backbone.conv.weight)


def test_maml_splits_a_fused_norm_and_activation_and_refuses_other_custom_norms():
    class NormThenAct(nn.BatchNorm2d):  # the shape of timm's BatchNormAct2d
        def __init__(self, width: int) -> None:
            super().__init__(width)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(super().forward(x))

    net = TinyConv()
    net.norm = NormThenAct(6)
    model = create_regime("maml", backbone=net, n_way=3)
    assert isinstance(net.norm.act, nn.ReLU)  # the activation stays, after the norm
    assert model.episode_loss(uint8_sampler().batch([0]))[0].isfinite()

    class Scaled(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    net.norm = Scaled(6)
    with pytest.raises(ValueError, match=r"Scaled \('norm'\) is a batch norm with a forward"):
        create_regime("maml", backbone=net, n_way=3)
