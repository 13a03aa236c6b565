"""FiLM, residual adapters and LoRA on the backbones: unchanged at start, named and counted
parameters, functional_call (MAML's inner loop), deepcopy and state_dict round trips."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.func import functional_call

from sharebone.adaptation import use_batch_statistics_
from sharebone.errors import SettingError
from sharebone.models import create_backbone
from sharebone.models.adapters import (
    Adapted,
    adapter_parameter_names,
    inject_adapters,
)

TINY = {
    "conv4": ({"name": "conv4", "in_channels": 3, "hidden": 4, "image_size": 16}, 16),
    "resnet12": ({"name": "resnet12", "in_channels": 3, "channels": [4, 4, 6, 8],
                  "image_size": 16}, 16),
    "wrn": ({"name": "wrn28_10", "in_channels": 3, "depth": 10, "widen_factor": 1}, 8),
    "timm": ({"name": "timm", "model": "test_resnet", "in_channels": 3}, 16),
    "mlp_bn": ({"name": "mlp", "in_features": 12, "hidden": [6, 5], "batch_norm": True}, None),
}
KINDS = {"film": {}, "residual": {}, "lora": {"rank": 2, "alpha": 3.0}}
CASES = [(b, k) for b in TINY for k in KINDS if not (b == "mlp_bn" and k == "residual")]


def build(backbone: str) -> tuple[nn.Module, torch.Tensor]:
    spec, side = TINY[backbone]
    if spec["name"] == "timm":
        timm = pytest.importorskip("timm")
        if not timm.is_model(spec["model"]):
            pytest.skip(f"timm {timm.__version__} has no {spec['model']!r}")
    torch.manual_seed(0)
    spec = dict(spec)
    net = create_backbone(spec.pop("name"), **spec)
    shape = (4, 12) if side is None else (4, 3, side, side)
    return net, torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def injected(backbone: str, kind: str) -> tuple[nn.Module, nn.Module, list[str], torch.Tensor]:
    plain, x = build(backbone)
    net = copy.deepcopy(plain)
    return plain, net, inject_adapters(net, kind, **KINDS[kind]), x


def perturb_(net: nn.Module, names: list[str]) -> None:
    g = torch.Generator().manual_seed(2)
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].add_(0.1 * torch.randn(params[name].shape, generator=g))


def expected_count(plain: nn.Module, kind: str) -> int:
    """What ``kind`` adds to ``plain``, counted from its layers."""
    total = 0
    for m in plain.modules():
        if kind == "film" and isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            total += 2 * m.num_features
        elif kind == "residual" and isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) \
                and m.groups == 1:
            total += m.out_channels * m.in_channels
        elif kind == "lora" and isinstance(m, nn.Conv2d | nn.Linear):
            total += 2 * (m.weight[0].numel() + m.weight.shape[0])
    return total


@pytest.mark.parametrize(("backbone", "kind"), CASES)
def test_the_backbone_is_unchanged_right_after_injection(backbone, kind):
    plain, net, names, x = injected(backbone, kind)
    assert names
    for train in (False, True):
        plain.train(train), net.train(train)
        assert torch.equal(net(x), plain(x)), f"{kind} changed {backbone} (train={train})"
    # ... and the adapters do change it once they move.
    perturb_(net, names)
    net.eval(), plain.eval()
    assert not torch.allclose(net(x), plain(x))


@pytest.mark.parametrize(("backbone", "kind"), CASES)
def test_the_added_parameters_are_named_and_counted(backbone, kind):
    plain, net, names, _ = injected(backbone, kind)
    before, after = dict(plain.named_parameters()), dict(net.named_parameters())
    assert set(after) - set(before) == set(names) and len(names) == len(set(names))
    assert set(before) <= set(after)  # the original parameters keep their names
    suffixes = {"film": ("film_gamma", "film_beta"), "residual": ("residual_adapter",),
                "lora": ("lora_A", "lora_B")}[kind]
    assert all(n.rsplit(".", 1)[-1] in suffixes for n in names)
    assert sum(after[n].numel() for n in names) == expected_count(plain, kind)
    assert adapter_parameter_names(net) == names


def test_conv4_counts_by_hand():
    """conv4, 3 -> 4 -> 4 -> 4 -> 4 channels: the numbers written out."""
    counts = {}
    for kind in KINDS:
        _, net, names, _ = injected("conv4", kind)
        counts[kind] = sum(dict(net.named_parameters())[n].numel() for n in names)
    # film: 4 norms x (4 + 4); residual: 4x3 + 3 x 4x4; lora r=2: (2x27 + 4x2) + 3 (2x36 + 4x2)
    assert counts == {"film": 32, "residual": 60, "lora": 302}
    _, net, names, _ = injected("conv4", "residual")
    assert names == [f"blocks.{i}.0.residual_adapter" for i in range(4)]


def test_timm_convs_are_found_by_module_type():
    _, net, names, _ = injected("timm", "residual")
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)
             and m.kernel_size == (3, 3) and m.groups == 1]
    assert names == [f"{n}.residual_adapter" for n in convs] and len(convs) >= 3


@pytest.mark.parametrize(("backbone", "kind"), [("conv4", k) for k in KINDS] +
                         [("resnet12", "lora"), ("timm", "film")])
def test_functional_call_swaps_adapter_params_and_their_gradients(backbone, kind):
    _, net, names, x = injected(backbone, kind)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
        if p.dim() == 1 and not p.any():  # timm zero-inits each block's last norm's weight:
            p.fill_(1.0)                  # a constant there has no gradient for film_gamma
    g = torch.Generator().manual_seed(3)
    params = dict(net.named_parameters())
    swapped = {n: (params[n] + 0.2 * torch.randn(params[n].shape, generator=g)).requires_grad_()
               for n in names}
    out = functional_call(net, swapped, (x,))
    assert not torch.allclose(out, net(x))
    out.square().sum().backward()
    assert all(swapped[n].grad is not None and swapped[n].grad.abs().sum() > 0 for n in names)
    assert all(p.grad is None for p in net.parameters())
    # The module's own adapter parameters are untouched by the call.
    assert all(torch.equal(params[n], dict(net.named_parameters())[n]) for n in names)


@pytest.mark.parametrize("kind", list(KINDS))
def test_deepcopy_and_state_dict_round_trips(kind):
    _, net, names, x = injected("resnet12", kind)
    perturb_(net, names)
    net.eval()
    twin = copy.deepcopy(net)
    assert torch.equal(twin(x), net(x))
    assert type(twin.blocks[0].conv1) is type(net.blocks[0].conv1)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    fresh, _ = build("resnet12")
    assert inject_adapters(fresh, kind, **KINDS[kind]) == names
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert torch.equal(fresh.eval()(x), net(x))
    # A plain backbone's checkpoint loads into an adapted one, missing only the adapters.
    plain, _ = build("resnet12")
    result = fresh.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(names) and not result.unexpected_keys


def test_lora_computes_w_plus_b_a_times_alpha_over_r():
    torch.manual_seed(0)
    linear, conv = nn.Linear(5, 3), nn.Conv2d(2, 3, 3, stride=2, padding=1)
    net = nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * 4 * 4, 5), linear)
    ref = copy.deepcopy(net)
    inject_adapters(net, "lora", rank=2, alpha=6.0)
    perturb_(net, adapter_parameter_names(net))
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        for plain, lora in zip(ref, net, strict=True):
            if isinstance(plain, nn.Linear | nn.Conv2d):
                assert lora.lora_A.shape == (2, plain.weight[0].numel())
                plain.weight += (lora.lora_B @ lora.lora_A).view(plain.weight.shape) * 3.0
    assert torch.allclose(net(x), ref(x), atol=1e-6)


def test_residual_adapter_is_a_parallel_1x1_conv_of_the_same_stride():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2)
    net = nn.Sequential(conv)
    inject_adapters(net, "residual")
    perturb_(net, ["0.residual_adapter"])
    x = torch.randn(1, 2, 9, 9)
    expected = nn.functional.conv2d(x, conv.weight, conv.bias, 2, 2, 2) + nn.functional.conv2d(
        x, conv.residual_adapter, stride=2)
    assert torch.allclose(net(x), expected, atol=1e-6)
    # A conv whose output a 1x1 conv cannot match (no padding) is not adapted.
    with pytest.raises(SettingError, match="found no module"):
        inject_adapters(nn.Sequential(nn.Conv2d(2, 3, 3)), "residual")


def test_film_after_maml_batch_statistics_norms():
    """MAML's transductive batch norm replaces nn.BatchNorm2d: FiLM goes on after it (before,
    the replacement refuses rather than silently dropping FiLM)."""
    _, x = build("conv4")
    net, _ = build("conv4")
    names = inject_adapters(use_batch_statistics_(net), "film")
    assert len(names) == 8
    perturb_(net, names)
    assert net(x).shape == (4, 4)
    adapted, _ = build("conv4")
    inject_adapters(adapted, "film")
    with pytest.raises(SettingError, match="forward of its own"):
        use_batch_statistics_(adapted)


def test_refusals_name_the_key():
    mlp = create_backbone("mlp", in_features=12, hidden=[6])
    with pytest.raises(SettingError, match=r"sharing\.adapters: 'film' found no module.*"
                                           r"BatchNorm1d/2d/3d, LayerNorm, GroupNorm"):
        inject_adapters(mlp, "film")
    assert not any(isinstance(m, Adapted) for m in mlp.modules())
    with pytest.raises(SettingError, match=r"sharing\.adapters\.kind .*film, residual, lora"):
        inject_adapters(mlp, "prefix")
    for rank in (0, -1, 1.5, True, "4"):
        with pytest.raises(SettingError, match=r"sharing\.adapters\.rank must be"):
            inject_adapters(mlp, "lora", rank=rank)
    with pytest.raises(SettingError, match=r"sharing\.adapters\.alpha"):
        inject_adapters(mlp, "lora", alpha=0)
    with pytest.raises(SettingError, match=r"sharing\.adapters\.rank does not apply to kind "
                                           r"'film'"):
        inject_adapters(mlp, "film", rank=4)
    inject_adapters(mlp, "lora")
    with pytest.raises(SettingError, match="already carry an adapter"):
        inject_adapters(mlp, "lora")
