"""The sharing map (issue 21): roles from patterns, the presets of configs/sharing/, the MAML
family obeying it (same meta-gradients as its ``adapt`` option), and the refusals."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from helpers.configs import FAST, compose_train
from omegaconf import OmegaConf

import sharebone.run.build as build
from sharebone.config import CONFIG_DIR
from sharebone.data.episodes import Episode
from sharebone.errors import SettingError
from sharebone.models.sharing import (
    ParameterSharing,
    SharingMap,
    block_counts,
    last_block,
    norm_parameters,
    role_counts,
)
from sharebone.regimes import ANIL, FOMAML, MAML, MetaSGD, load_regime

SPEC = {"name": "conv4", "in_channels": 1, "hidden": 4, "image_size": 16}
TINY_MLP = {"name": "mlp", "in_features": 6, "hidden": [8]}
PRESETS = {"maml": MAML, "fomaml": FOMAML, "anil": ANIL, "metasgd": MetaSGD}
SHARING_DIR = CONFIG_DIR / "sharing"


def preset(name: str) -> dict:
    """A sharing preset as the config group holds it (configs/sharing/<name>.yaml)."""
    return OmegaConf.to_container(OmegaConf.load(SHARING_DIR / f"{name}.yaml"))


def episode64(n_way=3, k_shot=2, q_query=3, tasks=2) -> Episode:
    g = torch.Generator().manual_seed(0)
    shape = (tasks, n_way * k_shot, 1, 16, 16)
    return Episode(
        support=torch.rand(shape, generator=g, dtype=torch.float64),
        support_labels=torch.arange(n_way).repeat_interleave(k_shot).repeat(tasks, 1),
        query=torch.rand((tasks, n_way * q_query, 1, 16, 16), generator=g, dtype=torch.float64),
        query_labels=torch.arange(n_way).repeat_interleave(q_query).repeat(tasks, 1),
        classes=torch.arange(n_way).repeat(tasks, 1))


def meta_grads(model: MAML, episode: Episode) -> dict[str, torch.Tensor | None]:
    model.zero_grad()
    loss, _ = model.episode_loss(episode)
    if loss.requires_grad:  # looped meta-training has taken the gradients already
        loss.backward()
    return {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}


# -- resolution -------------------------------------------------------------------------------
NAMES = ["backbone.blocks.0.0.weight", "backbone.blocks.0.0.bias", "backbone.blocks.0.1.weight",
         "backbone.blocks.0.1.bias", "head.weight", "head.bias"]


def test_roles_from_globs_and_selectors_rest_shared():
    roles = SharingMap(adapt=("head.*",), frozen=("bias",)).resolve(
        NAMES[:4] + ["head.weight"])
    assert roles == {NAMES[0]: "shared", NAMES[1]: "frozen", NAMES[2]: "shared",
                     NAMES[3]: "frozen", "head.weight": "adapt"}
    norm = {NAMES[2], NAMES[3]}
    assert SharingMap(adapt=("norm",)).resolve(NAMES, norm=norm) == {
        n: "adapt" if n in norm else "shared" for n in NAMES}


def test_norm_selector_and_last_block_read_the_real_conv4():
    model = MAML(SPEC, n_way=3)  # its batch norms are TransductiveBatchNorm by now
    norms = norm_parameters(model.backbone, "backbone.")
    assert norms == {f"backbone.blocks.{i}.1.{p}" for i in range(4) for p in ("weight", "bias")}
    assert last_block(model.backbone, "backbone.") == "backbone.blocks.3"


def test_a_pattern_that_matches_nothing_names_the_key_and_close_names():
    with pytest.raises(SettingError, match=r"sharing\.adapt: 'backbone\.blok\.\*' matches no "
                                           r"parameter\. Did you mean backbone\.blocks\.\*"):
        SharingMap(adapt=("backbone.blok.*",)).resolve(NAMES)
    with pytest.raises(SettingError, match=r"sharing\.frozen: 'norm' matches no parameter"):
        SharingMap(adapt=("head.*",), frozen=("norm",)).resolve(NAMES)  # no norm layer


def test_one_parameter_two_roles_is_refused():
    with pytest.raises(SettingError, match=r"sharing\.frozen: 'backbone\.\*' gives "
                                           r"backbone\.blocks\.0\.0\.bias the role 'frozen', "
                                           r"but sharing\.adapt already made it 'adapt'"):
        SharingMap(adapt=("bias",), frozen=("backbone.*",)).resolve(NAMES)


def test_unknown_selector_and_key_are_refused_with_did_you_mean():
    with pytest.raises(SettingError, match=r"sharing\.adapt: unknown selector 'norms'\. Did "
                                           r"you mean 'norm'\?"):
        SharingMap(adapt=("norms",))
    with pytest.raises(SettingError, match=r"sharing\.frozn: no such key\. Did you mean "
                                           r"sharing\.frozen\?"):
        SharingMap.of({"adapt": ["head.*"], "frozn": ["bias"]})
    with pytest.raises(SettingError, match=r"sharing\.adapt must be a list"):
        SharingMap.of({"adapt": "head.*"})


def test_an_unset_map_is_none_and_plain_data_round_trips():
    assert SharingMap.of(preset("none")) is None
    smap = SharingMap.of(preset("last_block"))
    assert smap == SharingMap(adapt=("last_block", "head.*"))
    assert SharingMap.of(smap.as_dict()) == smap


def test_counts_per_role_and_per_block():
    roles = {"backbone.a.w": "adapt", "backbone.b.w": "frozen", "head.weight": "shared"}
    sizes = {"backbone.a.w": 3, "backbone.b.w": 5, "head.weight": 7}
    assert role_counts(roles, sizes) == {"shared": 7, "adapt": 3, "task": 0, "frozen": 5}
    assert block_counts(roles, sizes) == {"backbone.a": {"adapt": 3}, "backbone.b": {"frozen": 5},
                                          "head": {"shared": 7}}
    plain = ParameterSharing(1, 2, roles=role_counts(roles, sizes)).as_dict()
    assert plain["role_frozen"] == 5 and "roles" not in plain


# -- the MAML family obeys it -----------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_adapt_option_and_its_preset_give_identical_meta_gradients(name):
    """``adapt: all`` / ``adapt: head`` are aliases of the all / head presets: float64, one
    fixed meta-batch, every parameter's meta-gradient bit for bit the same."""
    cls = PRESETS[name]
    torch.manual_seed(0)
    by_option = cls(SPEC, n_way=3, inner_steps=2, inner_lr=0.3, vmap=False).double()
    alias = "head" if by_option.hparams.adapt == "head" else "all"
    by_map = cls(SPEC, n_way=3, inner_steps=2, inner_lr=0.3, vmap=False,
                 sharing=preset(alias)).double()
    by_map.load_state_dict(by_option.state_dict())
    assert by_map.adapted_shapes() == by_option.adapted_shapes()
    episode = episode64()
    want, got = meta_grads(by_option, episode), meta_grads(by_map, episode)
    assert list(got) == list(want)
    assert all(g is not None for g in want.values())
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_regime_adapt_head_equals_sharing_head_on_a_maml_regime():
    """The map replaces the ``adapt`` option: MAML with sharing=head is ANIL."""
    torch.manual_seed(0)
    anil = ANIL(SPEC, n_way=3, vmap=False).double()
    maml = MAML(SPEC, n_way=3, vmap=False, sharing=preset("head")).double()
    maml.load_state_dict(anil.state_dict())
    want, got = meta_grads(anil, episode64()), meta_grads(maml, episode64())
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_boil_adapts_the_body_and_keeps_the_head_fixed_in_the_inner_loop():
    torch.manual_seed(0)
    model = MAML(TINY_MLP, n_way=3, inner_steps=1, inner_lr=0.5,
                 sharing=preset("body")).double()
    x = torch.randn(6, 6, dtype=torch.float64)
    y = torch.arange(3).repeat(2)
    adapted, _ = model.adapt_task(x, y, 3, 1, first_order=True)
    own = dict(model.named_parameters())
    body = [n for n in own if n.startswith("backbone.")]
    assert list(model.adapted_shapes()) == body
    loss = F.cross_entropy(model.forward_with(dict(model.head.named_parameters("head")), x), y)
    grads = dict(zip(body, torch.autograd.grad(loss, [own[n] for n in body]), strict=True))
    for n in body:  # one SGD step on the support loss, the head held fixed
        torch.testing.assert_close(adapted[n], own[n] - 0.5 * grads[n], rtol=0, atol=1e-12)
    assert torch.equal(adapted["head.weight"], own["head.weight"])
    assert torch.equal(adapted["head.bias"], own["head.bias"])
    grads = meta_grads(model, _mlp_episode())
    assert all(g is not None for g in grads.values())  # the head is meta-learned (shared)


def _mlp_episode() -> Episode:
    g = torch.Generator().manual_seed(2)
    return Episode(support=torch.randn(2, 6, 6, generator=g, dtype=torch.float64),
                   support_labels=torch.arange(3).repeat(2).repeat(2, 1),
                   query=torch.randn(2, 9, 6, generator=g, dtype=torch.float64),
                   query_labels=torch.arange(3).repeat(3).repeat(2, 1),
                   classes=torch.arange(3).repeat(2, 1))


def test_frozen_parameters_get_no_gradient_and_no_optimizer_step():
    torch.manual_seed(0)
    model = MAML(SPEC, n_way=3, vmap=False, sharing={"adapt": ["head.*", "last_block"],
                                                     "frozen": ["backbone.blocks.0.*"]}).double()
    frozen = {n for n, r in model.sharing_roles.items() if r == "frozen"}
    assert frozen == {f"backbone.blocks.0.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    own = dict(model.named_parameters())
    assert not any(own[n].requires_grad for n in frozen)
    grads = meta_grads(model, episode64())
    assert all(grads[n] is None for n in frozen)
    assert all(grads[n] is not None for n in own if n not in frozen)
    in_optimizer = {id(p) for p in model.optimizer_param_groups()}
    assert not any(id(own[n]) in in_optimizer for n in frozen)
    counts = model.parameter_sharing().roles
    assert counts["frozen"] == sum(own[n].numel() for n in frozen)
    assert sum(counts.values()) == sum(p.numel() for n, p in own.items()
                                       if n.startswith(("backbone.", "head.")))


def test_meta_sgd_has_step_sizes_for_exactly_the_adapted_set():
    model = MetaSGD(SPEC, n_way=3, sharing=preset("bias"))
    assert list(model.adapted_shapes()) == [n for n, _ in model.named_parameters()
                                            if n.endswith(".bias") and not
                                            n.startswith("step_sizes.")]
    assert [k.replace("__", ".") for k in model.step_sizes] == list(model.adapted_shapes())
    assert model.parameter_sharing().meta == sum(p.numel() for p in model.step_sizes.values())


def test_the_map_survives_a_checkpoint(tmp_path):
    model = MetaSGD(SPEC, n_way=3, sharing=preset("last_block"))
    path = tmp_path / "m.ckpt"
    import pytorch_lightning as pl

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, max_epochs=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path, weights_only=False)
    loaded = load_regime(path)
    assert loaded.hparams.sharing == {"adapt": ["last_block", "head.*"], "task": [],
                                      "frozen": []}
    assert loaded.sharing_roles == model.sharing_roles
    assert list(loaded.step_sizes) == list(model.step_sizes)


def test_the_maml_family_refuses_what_it_cannot_do_yet():
    with pytest.raises(SettingError, match=r"sharing\.task: the MAML family has no fresh"):
        MAML(SPEC, n_way=3, sharing={"adapt": ["head.*"], "task": ["backbone.blocks.3.*"]})
    with pytest.raises(SettingError, match=r"regime\.adapt='all': 'head\.\*'|nothing adapts"):
        MAML(SPEC, n_way=3, sharing={"adapt": [], "frozen": ["bias"]})
    with pytest.raises(SettingError, match=r"sharing\.frozen: .* but regime\.adapt='all' "
                                           r"already made it 'adapt'"):
        MAML(SPEC, n_way=3, sharing={"frozen": ["bias"]})  # adapt unset: the option's preset


# -- configs and build --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["all", "head", "body", "last_block", "norm", "bias"])
def test_every_preset_names_its_paper_and_builds_on_conv4(name):
    text = (SHARING_DIR / f"{name}.yaml").read_text()
    comment = " ".join(line for line in text.splitlines() if line.startswith("#"))
    assert re.search(r"\b(19|20)\d\d\b", comment), "its comment names a paper, with its year"
    model = MAML(SPEC, n_way=3, sharing=preset(name))
    assert model.parameter_sharing().roles["adapt"] > 0


def test_no_sharing_chosen_leaves_the_regime_as_it_was(tmp_path):
    cfg = compose_train(tmp_path, [*FAST, "regime=anil"])
    assert cfg.sharing == {"adapt": None, "task": None, "frozen": None, "adapters": None,
                           "test_steps": None, "test_lr": None, "branch_at": None}
    assert build.sharing_for(cfg) == {}


def _refused_before_data(monkeypatch, tmp_path, overrides: list[str]) -> str:
    def decode(*args):
        raise AssertionError("data decoded before the sharing map was checked")

    monkeypatch.setitem(build.TRAINING_DATA, "episodes", decode)
    monkeypatch.setitem(build.TRAINING_DATA, "tasks", decode)
    monkeypatch.setitem(build.TRAINING_DATA, "classes", decode)
    with pytest.raises(SettingError) as err:
        build.build_run(compose_train(tmp_path, [*FAST, *overrides]))
    return str(err.value)


@pytest.mark.parametrize("preset", ["body", "norm", "bias"])
def test_a_shared_head_at_other_ways_than_trained_is_refused_before_data(monkeypatch, tmp_path,
                                                                          preset):
    # Its 20 rows would all be the 5-way head's mean row: every query alike, exactly chance.
    message = _refused_before_data(monkeypatch, tmp_path, [
        "regime=maml", "backbone=conv4", f"sharing={preset}", "sampler.train.n_way=5",
        "test.settings=[{n_way: 5, k_shot: 1}, {n_way: 20, k_shot: 1}]"])
    assert message.startswith("test.settings: 20-way episodes, but the map keeps head.weight "
                              "'shared'")
    assert "Fix: test at 5 ways, add head.* to sharing.adapt" in message


def test_a_head_that_adapts_or_is_zero_may_meet_other_ways(tmp_path):
    settings = "test.settings=[{n_way: 5, k_shot: 1}, {n_way: 20, k_shot: 1}]"
    for extra in (["sharing=film"], ["sharing=body", "regime.head=zero"]):
        cfg = compose_train(tmp_path, [*FAST, "regime=maml", "backbone=conv4",
                                       "sampler.train.n_way=5", settings, *extra])
        assert build.sharing_for(cfg)["sharing"]["adapt"]


def test_command_line_lists_build_and_bad_ones_are_refused_before_data(monkeypatch, tmp_path):
    cfg = compose_train(tmp_path, [*FAST, "regime=maml", "backbone=conv4",
                                   "sharing.adapt=[backbone.blocks.3.*,head.*]"])
    assert build.sharing_for(cfg) == {"sharing": {"adapt": ["backbone.blocks.3.*", "head.*"],
                                                  "task": [], "frozen": []}}
    text = _refused_before_data(monkeypatch, tmp_path, [
        "regime=maml", "backbone=conv4", "sharing.adapt=[backbone.blok.*]"])
    assert text.startswith("sharing.adapt: 'backbone.blok.*' matches no parameter")
    assert "backbone.blocks.*" in text
    text = _refused_before_data(monkeypatch, tmp_path, [
        "regime=maml", "backbone=conv4", "sharing=bias", "sharing.frozen=[backbone.*]"])
    assert text.startswith("sharing.frozen:") and "one role" in text


def test_a_regime_that_cannot_follow_a_map_refuses_it_and_says_which_can(monkeypatch,
                                                                          tmp_path):
    """A regime of one's own that takes no map (``follows_sharing_map`` unset) refuses one
    before any data is read, naming the regimes that follow maps."""
    from sharebone.regimes import REGIMES, ProtoNet

    class NoMap(ProtoNet):
        follows_sharing_map = False

    monkeypatch.setitem(REGIMES._factories, "no_map_test", NoMap)
    text = _refused_before_data(monkeypatch, tmp_path, [
        "regime=protonet", "regime.name=no_map_test", "sharing=head"])
    assert text.startswith("sharing.adapt: regime 'no_map_test' has no way")
    assert all(name in text for name in ("anil", "finetune", "fomaml", "imaml", "maml",
                                         "metasgd", "multitask", "pretrain", "protonet",
                                         "reptile"))


@pytest.mark.parametrize("regime", ["protonet", "multitask", "pretrain"])
def test_the_embedding_regimes_refuse_a_bad_map_before_data(regime, monkeypatch, tmp_path):
    text = _refused_before_data(monkeypatch, tmp_path, [
        f"regime={regime}", "sharing.adapt=[backbone.blok.*]"])
    assert text.startswith("sharing.adapt: 'backbone.blok.*' matches no parameter")
    if regime != "multitask":  # multitask copies task tensors per task (test_branches.py)
        text = _refused_before_data(monkeypatch, tmp_path, [
            f"regime={regime}", "sharing.task=[backbone.*]"])
        assert text.startswith(f"sharing.task: {regime} makes a task's part itself")
    text = _refused_before_data(monkeypatch, tmp_path, [
        f"regime={regime}", "sharing=norm", "sharing.frozen=[norm]"])
    assert text.startswith("sharing.frozen:") and "one role" in text
    text = _refused_before_data(monkeypatch, tmp_path, [
        f"regime={regime}", "sharing.test_steps=5"])
    assert text.startswith("sharing.test_steps=5, but nothing adapts")


def test_a_run_prints_logs_and_checkpoints_its_sharing_map(tmp_path, capsys):
    from sharebone.run.train import run

    run(compose_train(tmp_path, [*FAST, "regime=maml", "sharing=last_block",
                                 "sampler.batches_per_epoch=2", "test.episodes=2",
                                 "test.settings=[{n_way: 5, k_shot: 1}]", "figures.enabled=false"]))
    printed = capsys.readouterr().out
    line = next(s for s in printed.splitlines() if s.startswith("[sharebone] maml"))
    adapt = int(re.search(r"roles: shared=[\d,]+ adapt=([\d,]+)", line)[1].replace(",", ""))
    ckpt = next(tmp_path.rglob("last.ckpt"))
    model = load_regime(ckpt)
    assert model.hparams.sharing["adapt"] == ["last_block", "head.*"]
    assert adapt == sum(torch.Size(s).numel() for s in model.adapted_shapes().values())
    assert any(n.startswith("backbone.") for n in model.adapted_shapes())
    results = [p for p in tmp_path.rglob("*.json") if "role_adapt" in p.read_text()]
    assert results, "the per-role counts are in the run's results"


@pytest.mark.parametrize("name", ["body", "bias", "norm"])
def test_a_custom_map_gives_the_same_meta_gradient_vmapped_and_looped(name):
    torch.manual_seed(0)
    looped = MetaSGD(SPEC, n_way=3, inner_steps=2, inner_lr=0.3, vmap=False,
                     sharing=preset(name)).double()
    vmapped = MetaSGD(SPEC, n_way=3, inner_steps=2, inner_lr=0.3, vmap=True,
                      sharing=preset(name)).double()
    vmapped.load_state_dict(looped.state_dict())
    want, got = meta_grads(looped, episode64()), meta_grads(vmapped, episode64())
    for k in want:
        assert (got[k] is None) == (want[k] is None), k
        if want[k] is not None:
            torch.testing.assert_close(got[k], want[k], msg=k)


def test_sharebone_eval_refuses_a_shared_head_at_other_ways_before_data(tmp_path):
    from helpers.training import fit

    import sharebone.run.eval as sb_eval

    model = MAML({"name": "conv4", "in_channels": 1, "hidden": 4, "image_size": 16}, n_way=3,
                 sharing=preset("body"))
    _, ckpt = fit(model, tmp_path, max_steps=1)
    with pytest.raises(SettingError, match=r"^settings: 5-way episodes, but the map keeps "
                                           r"head\.weight 'shared' .* trained at 3 ways"):
        sb_eval.run(compose_train(tmp_path, [f"ckpt={ckpt}", "episodes=2",
                                             "settings=[{n_way: 5, k_shot: 1}]"],
                                  config_name="eval"))
