"""Every registered backbone, tiny: right feature size, gradients everywhere, every regime.

The real sizes (ResNet-12 at 64-160-320-640, WRN-28-10) are only built and counted here;
``scripts/bench_backbones.py`` runs them at 84x84.
"""

from __future__ import annotations

import sys

import pytest
import torch
from helpers.configs import FAST, compose_train
from hydra.utils import instantiate
from torch import nn

from sharebone.adaptation import TransductiveBatchNorm
from sharebone.data.episodes import EpisodeSampler
from sharebone.models import BACKBONES, count_parameters, create_backbone
from sharebone.models.analysis import layer_groups
from sharebone.models.resnet import drop_block
from sharebone.regimes import FineTune, MultiTask, Pretrain, ProtoNet, create_regime

#: A tiny version of every registered backbone on 3x16x16 images; a new backbone adds itself.
TINY = {
    "conv4": {"name": "conv4", "in_channels": 3, "hidden": 4, "image_size": 16},
    "mlp": {"name": "mlp", "in_features": 3 * 16 * 16, "hidden": [8, 8]},
    "resnet12": {"name": "resnet12", "in_channels": 3, "channels": [4, 4, 6, 8],
                 "image_size": 16, "drop_block": True},
    "wrn28_10": {"name": "wrn28_10", "in_channels": 3, "depth": 10, "widen_factor": 1,
                 "image_size": 16},
    # EfficientNet: timm's fused BatchNormAct2d layers, the case that needs care under MAML.
    "timm": {"name": "timm", "model": "test_efficientnet", "in_channels": 3, "image_size": 16},
}
NEEDS_TIMM = "timm is not installed (pip install timm, or the 'timm' extra): timm backbones skipped"
HUB_REASON = "huggingface_hub (installed with timm, the 'timm' extra) holds the weights cache"
GRADIENT_REGIMES = {"maml": {}, "maml-vmap": {"vmap": True}, "fomaml": {}, "anil": {},
                    "metasgd": {}}


def tiny_spec(name: str) -> dict:
    assert name in TINY, f"backbone '{name}' is registered but has no tiny spec in TINY"
    if TINY[name]["name"] == "timm":
        need_timm_model(TINY[name]["model"])
    return dict(TINY[name])


def need_timm_model(model: str):
    """Skip unless timm, with its tiny test model ``model``, is installed."""
    timm = pytest.importorskip("timm", reason=NEEDS_TIMM)
    if not timm.is_model(model):
        pytest.skip(f"timm {timm.__version__} has no tiny test model {model!r}; a newer one has")
    return timm


def episode(n_way: int = 2, k_shot: int = 2, q_query: int = 2, tasks: int = 2):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8 * n_way, 3, 16, 16), generator=g, dtype=torch.uint8)
    sampler = EpisodeSampler(images, torch.arange(8 * n_way) // 8, n_way, k_shot, q_query)
    return sampler.batch(range(tasks)).to_float()


def assert_every_parameter_has_a_finite_gradient(model: nn.Module) -> None:
    named = list(model.named_parameters())
    assert named, "no parameters"
    for name, p in named:
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


# ------------------------------------------------------------------------ every backbone


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_gives_num_features_gradients_everywhere_and_no_nans(name):
    torch.manual_seed(0)
    model = _build(tiny_spec(name))
    features = model(torch.randn(4, 3, 16, 16))
    assert features.shape == (4, model.num_features)
    assert torch.isfinite(features).all()
    features.pow(2).mean().backward()
    assert_every_parameter_has_a_finite_gradient(model)
    for pname, p in model.named_parameters():
        assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


def _build(spec: dict) -> nn.Module:
    spec = dict(spec)
    return create_backbone(spec.pop("name"), **spec)


@pytest.mark.parametrize("regime", GRADIENT_REGIMES)
@pytest.mark.parametrize("name", BACKBONES.names())
def test_one_meta_step_of_every_gradient_based_regime_on_every_backbone(name, regime):
    """MAML's inner loop runs the backbone through functional_call (and vmap): one meta-step
    gives a finite loss and a meta-gradient for every parameter."""
    torch.manual_seed(0)
    model = create_regime(regime.split("-")[0], backbone=tiny_spec(name), n_way=2,
                          inner_lr=0.01, **GRADIENT_REGIMES[regime])
    loss, predictions = model.episode_loss(episode())
    assert torch.isfinite(loss) and predictions.shape == (2, 4, 2)
    loss.backward()
    assert_every_parameter_has_a_finite_gradient(model)


@pytest.mark.parametrize("name", BACKBONES.names())
def test_maml_gives_every_backbone_conv4s_batch_norm(name):
    """Transductive batch norm replaces every batch norm (no running statistics, no buffer
    for the inner loop to update), as for conv4."""
    model = create_regime("maml", backbone=tiny_spec(name), n_way=2)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for m in model.backbone.modules())
    assert list(model.backbone.buffers()) == []
    plain = _build(tiny_spec(name))
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    assert sum(isinstance(m, TransductiveBatchNorm) for m in model.backbone.modules()) == norms
    assert count_parameters(model.backbone) == count_parameters(plain)


@pytest.mark.parametrize("name", BACKBONES.names())
def test_protonet_step_and_parameter_count_on_every_backbone(name):
    torch.manual_seed(0)
    model = ProtoNet(tiny_spec(name))
    loss, logits = model.episode_loss(episode())
    assert torch.isfinite(loss) and logits.shape == (2, 4, 2)
    loss.backward()
    assert_every_parameter_has_a_finite_gradient(model)
    assert model.parameter_sharing().shared == count_parameters(model.backbone)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("name", BACKBONES.names())
def test_heads_on_num_features_for_multitask_pretrain_and_finetune(name):
    torch.manual_seed(0)
    spec = tiny_spec(name)
    inputs = torch.randn(8, 3, 16, 16)
    multitask = MultiTask(spec, heads={"a": 3, "b": 2}, conflict_every=0)
    multitask.task_names = ["a", "b"]
    loss = multitask.training_step((inputs, torch.tensor([0, 1] * 4), torch.arange(8) % 2), 0)
    loss.backward()
    assert_every_parameter_has_a_finite_gradient(multitask)
    pretrain = Pretrain(spec, num_classes=4)
    pretrain.training_step((inputs, torch.arange(8) % 4, torch.zeros(8).long()), 0).backward()
    assert_every_parameter_has_a_finite_gradient(pretrain)
    finetune = FineTune(backbone=spec, num_classes=3, mode="full")
    assert finetune.head.in_features == finetune.backbone.num_features
    finetune.training_step((inputs, torch.arange(8) % 3), 0).backward()
    assert_every_parameter_has_a_finite_gradient(finetune)
    with torch.no_grad():
        assert finetune.eval().predict_episode(episode()).shape == (2, 4, 2)


@pytest.mark.parametrize("name", BACKBONES.names())
def test_layer_groups_split_every_backbone_into_layers(name):
    """Gradual unfreezing and the layer analysis see each backbone's layers, every parameter
    in exactly one (resnet12: its 4 blocks; a timm model: stem, blocks, head)."""
    backbone = _build(tiny_spec(name))
    groups = layer_groups(backbone)
    assert len(groups) >= 2
    ids = [id(p) for g in groups for p in g.parameters()]
    assert sorted(ids) == sorted(id(p) for p in backbone.parameters())
    expected = {"resnet12": ["blocks.0", "blocks.1", "blocks.2", "blocks.3"],
                "wrn28_10": ["layers.0", "layers.1", "layers.2", "layers.3"]}
    if name in expected:
        assert [g.name for g in groups] == expected[name]


def test_an_unknown_backbone_lists_the_known_ones_and_timm():
    with pytest.raises(KeyError, match="Known: conv4, mlp, resnet12, timm, wrn28_10.*timm:<"):
        create_backbone("resnet999")


# --------------------------------------------------------------------------- the real sizes


def test_resnet12_has_metaoptnets_widths_and_12_4m_parameters():
    model = create_backbone("resnet12")
    assert model.num_features == 640
    widths = [(3, 64), (64, 160), (160, 320), (320, 640)]
    convs = sum(9 * a * b + 2 * 9 * b * b + a * b for a, b in widths)  # 3x3 x3 + 1x1 shortcut
    norms = sum(4 * 2 * b for _, b in widths)                           # 3 + shortcut's
    assert count_parameters(model) == convs + norms == 12_424_320
    blocks = list(model.blocks)
    assert len(blocks) == 4 and all(isinstance(b.act, nn.LeakyReLU) for b in blocks)
    assert blocks[0].act.negative_slope == 0.1


def test_wrn28_10_has_640_features_and_36_5m_parameters():
    model = create_backbone("wrn28_10")
    assert model.num_features == 640
    assert count_parameters(model) == pytest.approx(36.5e6, rel=0.01)
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
               for m in model.modules()) == 25  # 1 + 3 groups x 4 blocks x 2


def test_conv4_at_84x84_rgb_is_mamls_miniimagenet_net():
    model = create_backbone("conv4", in_channels=3, hidden=32, image_size=84)
    assert model.num_features == 32 * 5 * 5 == 800
    assert model(torch.randn(2, 3, 84, 84)).shape == (2, 800)


@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("resnet12", {"image_size": 8}, "too small"),
    ("resnet12", {"channels": [4, 4, 4]}, "4 widths"),
    ("resnet12", {"drop_rate": 1.0}, "drop_rate"),
    ("wrn28_10", {"depth": 27}, "6n \\+ 4"),
])
def test_bad_residual_settings_are_refused(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_backbone(name, **kwargs)


def test_drop_block_drops_whole_blocks_at_the_rate_and_only_in_training():
    torch.manual_seed(0)
    x = torch.ones(64, 8, 10, 10)
    y = drop_block(x, drop_rate=0.1, block_size=5)
    kept = (y > 0).float()
    assert kept.mean().item() == pytest.approx(0.9, abs=0.03)
    assert y.sum().item() == pytest.approx(x.sum().item(), rel=1e-4)  # rescaled
    # A dropped pixel lies in a dropped 5x5 square.
    dropped = 1 - kept
    eroded = -torch.nn.functional.max_pool2d(-dropped, 5, stride=1)
    opened = torch.nn.functional.max_pool2d(torch.nn.functional.pad(eroded, [4] * 4), 5, stride=1)
    assert dropped.sum() > 0 and torch.equal(opened, dropped)
    net = create_backbone("resnet12", channels=[4, 4, 6, 8], image_size=16, drop_block=True)
    images = torch.randn(3, 3, 16, 16)
    net.eval()
    assert torch.equal(net(images), net(images))


# ----------------------------------------------------------------------------------- timm


@pytest.fixture
def timm():
    return pytest.importorskip("timm", reason=NEEDS_TIMM)


def test_timm_prefix_names_the_model(timm):
    need_timm_model("test_resnet")
    a = create_backbone("timm:test_resnet", in_channels=1)
    b = create_backbone("timm", model="test_resnet", in_channels=1)
    assert type(a.model) is type(b.model) and a.num_features == b.num_features == 96
    with pytest.raises(ValueError, match="names its timm model already"):
        create_backbone("timm:test_resnet", model="resnet18")


@pytest.mark.parametrize("model", ["test_resnet", "test_vit", "test_mambaout"])
def test_timm_models_give_their_pooled_features_and_train_with_maml(timm, model):
    """A ViT (attention, LayerNorm, fixed input size) and MambaOut (a pre-logits layer: its
    features are head_hidden_size wide, not num_features) besides a ResNet."""
    need_timm_model(model)
    torch.manual_seed(0)
    spec = {"name": f"timm:{model}", "in_channels": 3, "image_size": 16}
    backbone = _build(spec)
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, backbone.num_features)
    maml = create_regime("maml", backbone=spec, n_way=2, inner_lr=0.01)
    loss, _ = maml.episode_loss(episode())
    loss.backward()
    assert torch.isfinite(loss)
    assert_every_parameter_has_a_finite_gradient(maml)


def test_timm_batch_norm_act_becomes_a_plain_batch_norm_with_the_same_function(timm):
    need_timm_model("test_efficientnet")
    torch.manual_seed(0)
    raw = timm.create_model("test_efficientnet", num_classes=0)
    assert any(type(m) is not nn.BatchNorm2d and isinstance(m, nn.BatchNorm2d)
               for m in raw.modules())
    backbone = create_backbone("timm:test_efficientnet")
    backbone.model.load_state_dict(_split_keys(raw.state_dict(), backbone))
    assert all(type(m) is nn.BatchNorm2d for m in backbone.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
    x = torch.randn(2, 3, 32, 32)
    raw.eval()
    backbone.eval()
    torch.testing.assert_close(backbone(x), raw(x))


def _split_keys(state: dict, backbone: nn.Module) -> dict:
    """``raw``'s weights under the split model's names (``bn1.weight`` -> ``bn1.norm.weight``)."""
    names = set(backbone.model.state_dict())
    out = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        out[key if key in names else f"{prefix}.norm.{leaf}"] = value
    assert set(out) == names
    return out


def test_timm_layer_groups_are_the_models_blocks(timm):
    need_timm_model("test_resnet")
    groups = layer_groups(create_backbone("timm:test_resnet"))
    names = [g.name for g in groups]
    assert names[0].startswith("model.conv1") and names[-1].startswith("model.layer4")
    assert [n for n in names if n.startswith("model.layer")] == [f"model.layer{i}"
                                                                 for i in range(1, 5)]


def test_timm_unknown_model_suggests_close_names(timm):
    with pytest.raises(ValueError, match="Unknown timm model 'resnet181'.*resnet18"):
        create_backbone("timm:resnet181")


def test_timm_pretrained_weights_missing_offline_give_a_clear_error(timm, tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants", reason=HUB_REASON)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="pretrained weights for 'resnet18'.*pretrained=false"):
        create_backbone("timm:resnet18", pretrained=True)


def test_a_checkpoint_of_a_pretrained_timm_backbone_loads_without_the_weights_cache(
        timm, tmp_path, monkeypatch):
    """Its own weights replace the pretrained ones, so rebuilding it must not fetch those."""
    need_timm_model("test_resnet")
    from sharebone.regimes import load_regime

    constants = pytest.importorskip("huggingface_hub.constants", reason=HUB_REASON)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    spec = {"name": "timm", "model": "test_resnet", "in_channels": 3, "image_size": 16}
    model = ProtoNet(spec)
    hparams = {**dict(model.hparams), "backbone": {**spec, "pretrained": True}}
    torch.save({"sharebone": {"regime": "protonet", "hparams": hparams, "config": None},
                "state_dict": model.state_dict()}, tmp_path / "model.ckpt")
    loaded = load_regime(tmp_path / "model.ckpt")
    assert loaded.hparams.backbone["pretrained"] is True
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(RuntimeError, match="pretrained weights"):  # outside a load: fetched
        create_backbone("timm:test_resnet", pretrained=True)


def test_timm_backbone_without_timm_says_pip_install_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(ImportError, match="pip install timm"):
        create_backbone("timm:resnet18")
    with pytest.raises(ImportError, match="pip install timm"):
        create_backbone("timm", model="resnet18")


# ------------------------------------------------------------------------- configs and runs

CONFIGS = {
    "resnet12": ["backbone.channels=[4,4,6,8]", "backbone.drop_block=true"],
    "wrn28_10": ["backbone.depth=10", "backbone.widen_factor=1"],
    "conv4_84": [],
    "timm": ["backbone.model=test_resnet"],
}


@pytest.mark.parametrize("config", CONFIGS)
def test_backbone_configs_build_from_the_task(config, tmp_path):
    if config == "timm":
        need_timm_model("test_resnet")
    cfg = compose_train(tmp_path, ["task=synthetic_images", "regime=protonet",
                                   f"backbone={config}", *CONFIGS[config]])
    model = instantiate(cfg.regime, _convert_="all")
    assert cfg.regime.backbone.in_channels == cfg.task.channels == 1
    assert cfg.regime.backbone.image_size == cfg.task.image_size == 28
    features = model.backbone(torch.randn(2, 1, 28, 28))
    assert features.shape == (2, model.backbone.num_features)
    if config == "conv4_84":
        assert model.backbone.num_features == 32  # 28 -> 1x1 after 4 pools, 32 filters


def test_maml_run_on_resnet12_trains_checkpoints_and_reloads(tmp_path):
    from sharebone.regimes import load_regime
    from sharebone.run.train import run

    cfg = compose_train(tmp_path, FAST + [
        "regime=maml", "backbone=resnet12", "backbone.channels=[4,4,6,8]",
        "backbone.drop_block=true", "sampler.batches_per_epoch=2", "sampler.val_episodes=2",
        "test.episodes=2", "test.settings=[{n_way: 5, k_shot: 1}]", "task.image_size=16"])
    metrics = run(cfg)
    assert 0 <= metrics["test/5w1s/acc"] <= 1
    model = load_regime(tmp_path)
    assert model.hparams.backbone["name"] == "resnet12"
    assert model.backbone.num_features == 8
