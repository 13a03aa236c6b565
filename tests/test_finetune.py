"""Pre-training and transfer: real runs through sharebone-train on generated images."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers.configs import FAST, compose_train
from pytorch_lightning.callbacks import BackboneFinetuning

from sharebone.checkpoint_io import CheckpointError
from sharebone.errors import SettingError
from sharebone.models.analysis import layer_change
from sharebone.regimes import load_regime
from sharebone.regimes.finetune import FineTune, GradualUnfreezing, Pretrain
from sharebone.run.train import run

ONE_SETTING = ["test.settings=[{n_way: 5, k_shot: 1}]"]
#: An MLP backbone: same code paths as conv4, a fraction of the CPU time.
MLP = FAST + ["backbone=mlp"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    metrics = run(compose_train(out, MLP + ["regime=pretrain", "test.episodes=8"]))
    return out, metrics


def finetune(tmp_path, source, *overrides: str) -> tuple[dict, FineTune]:
    cfg = compose_train(tmp_path, MLP + ONE_SETTING + ["regime=finetune",
                                                       f"regime.source={source}", *overrides])
    metrics = run(cfg)
    return metrics, load_regime(tmp_path / "checkpoints" / "last.ckpt")


def backbone_change(model, source) -> list[float]:
    """Per layer: how far the fine-tuned backbone moved from the source's."""
    rows = layer_change(load_regime(source).backbone, model.backbone)
    return [row["relative_change"] for row in rows]


def test_pretrain_fills_its_classes_scores_every_setting_and_reloads(pretrained):
    out, metrics = pretrained
    for setting in ("5w1s", "5w5s", "20w1s", "20w5s"):
        chance = 1 / int(setting.split("w")[0])
        assert metrics[f"test/{setting}/acc"] > chance + 3 * metrics[f"test/{setting}/ci95"]
    model = load_regime(out)
    assert isinstance(model, Pretrain) and model.hparams.num_classes == 64  # synthetic train
    sharing = model.parameter_sharing()  # mlp: 64 features, 64 classes
    assert sharing.task_specific == 64 * 64 + 64


def test_linear_probe_leaves_the_backbone_exactly_as_pretrained(pretrained, tmp_path):
    source, _ = pretrained
    _, model = finetune(tmp_path, source, "regime.mode=probe", "trainer.max_epochs=2")
    assert backbone_change(model, source) == [0.0] * 3
    # batch-norm statistics too: the probe sees fixed features
    before = load_regime(source).backbone.state_dict()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.hparams.num_classes == 16  # the val split is the new task
    assert model.parameter_sharing().task_specific == 64 * 16 + 16  # mlp: 64 features


def test_gradual_unfreezing_moves_top_layers_first(pretrained, tmp_path):
    source, _ = pretrained
    _, model = finetune(tmp_path, source, "regime.mode=gradual", "trainer.max_epochs=3",
                        "regime.unfreeze_at_epoch=1")
    change = backbone_change(model, source)
    assert change[0] == 0.0  # the bottom layer: not yet unfrozen after 3 epochs
    assert change[1] > 0.0 and change[2] > 0.0
    assert [type(c) for c in model.configure_callbacks()] == [GradualUnfreezing]


def test_discriminative_learning_rates_decay_with_depth():
    model = FineTune(backbone={"name": "conv4"}, num_classes=3, mode="gradual", lr=1.0,
                     lr_decay=0.5)  # conv4: every block has a batch norm of identical init
    callback = GradualUnfreezing(start=0, every=1, decay=0.5)
    callback.freeze_before_training(model)
    optimizer = model.configure_optimizers()
    for epoch in range(4):
        callback.finetune_function(model, epoch, optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 0.5, 0.25, 0.125, 0.0625]
    assert all(p.requires_grad for p in model.backbone.parameters())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in model.backbone.parameters())


def test_backbone_mode_is_lightnings_backbone_finetuning(pretrained, tmp_path):
    source, _ = pretrained
    _, model = finetune(tmp_path, source, "regime.mode=backbone", "trainer.max_epochs=2",
                        "regime.unfreeze_at_epoch=1")
    assert all(c > 0 for c in backbone_change(model, source))
    assert [type(c) for c in model.configure_callbacks()] == [BackboneFinetuning]


def test_a_finetuned_checkpoint_loads_without_its_source(pretrained, tmp_path):
    source, _ = pretrained
    copy = tmp_path / "source.ckpt"
    shutil.copy(source / "checkpoints" / "last.ckpt", copy)
    run_dir = tmp_path / "run"
    finetune(run_dir, copy, "regime.mode=full")
    copy.unlink()
    model = load_regime(run_dir)
    assert model.hparams.mode == "full" and model.hparams.source == str(copy)


def test_probe_on_a_checkpoint_without_a_backbone_is_refused(pretrained, tmp_path):
    source, _ = pretrained
    checkpoint = torch.load(source / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                if not k.startswith("backbone.")}
    bad = tmp_path / "headless.ckpt"
    torch.save(checkpoint, bad)
    cfg = compose_train(tmp_path, MLP + ONE_SETTING + ["regime=finetune",
                                                       f"regime.source={bad}"])
    with pytest.raises(CheckpointError, match="has no backbone to transfer"):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(CheckpointError, match="has no backbone to transfer"):
        FineTune(source=str(bad), backbone=None)


def test_a_source_with_another_backbone_is_refused(pretrained, tmp_path):
    source, _ = pretrained
    cfg = compose_train(tmp_path, FAST + ONE_SETTING + ["regime=finetune",
                                                        f"regime.source={source}"])
    with pytest.raises(CheckpointError, match=r"has backbone \(name=mlp.*\(name=conv4"):
        run(cfg)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        FineTune(backbone={"name": "conv4"}, num_classes=3, mode="thaw")


@pytest.mark.parametrize(("preset", "trains"), [("bias", "bias"), ("lora", "lora_")])
def test_a_sharing_preset_says_what_transfers_and_the_rest_stays_as_pretrained(
        pretrained, tmp_path, preset, trains):
    """The fine-tuning modes as sharing maps: BitFit trains the biases and the new head, LoRA
    its added factors (the source loads into the adapted backbone); nothing else moves."""
    source = pretrained[0] / "checkpoints" / "best.ckpt"
    _, model = finetune(tmp_path, source, f"sharing={preset}")
    roles = model.sharing_roles
    assert {roles["head.weight"], roles["head.bias"]} == {"task"}
    adapted = [n for n, r in roles.items() if r == "adapt"]
    assert adapted and all(trains in n for n in adapted)
    assert all(r == "frozen" for n, r in roles.items() if n not in adapted and
               not n.startswith("head."))
    source_weights = load_regime(source).backbone.state_dict()
    for name, value in model.backbone.state_dict().items():
        if f"backbone.{name}" in roles and roles[f"backbone.{name}"] == "frozen":
            assert torch.equal(value, source_weights[name]), name
    moved = [n for n in adapted if n.removeprefix("backbone.") in source_weights and not
             torch.equal(model.backbone.state_dict()[n.removeprefix("backbone.")],
                         source_weights[n.removeprefix("backbone.")])]
    assert moved or preset == "lora"  # LoRA's factors are new: nothing of the source to move
    counts = model.sharing_counts()
    assert counts.roles["adapt"] == sum(dict(model.named_parameters())[n].numel()
                                        for n in adapted)


def test_a_sharing_map_and_a_mode_together_are_refused(pretrained):
    with pytest.raises(SettingError, match=r"regime.mode='full' and a sharing map both say"):
        FineTune(backbone={"name": "mlp", "in_features": 4}, num_classes=3, mode="full",
                 sharing={"adapt": ["bias"]})
