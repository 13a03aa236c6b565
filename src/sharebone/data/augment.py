"""Data augmentation and normalisation of whole meta-batches, on the device the batch is on.

Episodes travel as uint8 and become the model's float input on its device
(:meth:`EpisodeSampler.prepare <sharebone.data.episodes.EpisodeSampler.prepare>`). An
:class:`EpisodeTransform` is what that step does for a split of a natural-image task: random
resized crop or random crop with padding, horizontal flip, a random affine map (rotation,
shear, scale, translation: the small distortions of handwriting), colour jitter, then
normalisation,
for every image of a meta-batch in a handful of batched tensor operations (one
``grid_sample`` for all the geometry; no Python loop over images).

Every image gets its own random parameters, and they are a pure function of ``(seed, split,
episode index, image slot)``: drawn with the episode sampler's counter-based hash
(:func:`sharebone.data.episodes.uniform`, stream ``AUGMENT_STREAM``), not from a generator. So
an augmented episode is as addressable as the episode: the same on any device, in any batch, on
any DDP rank, and a resumed run sees exactly the augmented images it would have seen.

Why not one call of a ``torchvision.transforms.v2`` pipeline on the batch: a v2 transform draws
*one* set of random parameters per call, so a ``[B, C, H, W]`` batch would get the same crop,
flip and jitter on every image. The operations here follow torchvision's definitions, per
image; torchvision's batched kernels are used where the operation has no random parameter
(``to_dtype``, ``rgb_to_grayscale``, ``normalize``). Differences, by design: the crop is
resampled bilinearly from the continuous crop box (no antialiasing; random resized crops
mostly enlarge), a crop whose 10 draws all fall outside the image is the whole image, and the
colour jitter's four operations run in a fixed order (brightness, contrast, saturation, hue)
rather than a random one.

Config (per split, ``augment.<split>`` of a task family; all optional)::

    random_resized_crop: {scale: [0.08, 1.0], ratio: [0.75, 1.3333]}   # or true: these
    random_crop: {padding: 8}           # or an int: shift by up to 8 px, zeros outside
    horizontal_flip: 0.5                # probability (true: 0.5)
    random_affine: {degrees: 10, translate: [0.1, 0.1], scale: [0.9, 1.1], shear: 10}
                                        # torchvision's RandomAffine ranges (shear along x);
                                        # applied after any crop and flip
    color_jitter: {brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.0}

and ``normalize: {mean: [...], std: [...]}`` (values for pixels in ``[0, 1]``) for every split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from sharebone.data.episodes import AFFINE_STREAM, AUGMENT_STREAM, Episode, uniform
from sharebone.errors import SettingError

__all__ = ["AUGMENT_KEYS", "EpisodeTransform", "augment_images", "check_augment",
           "check_normalize", "check_split_augment"]

#: Keys an ``augment.<split>`` block may have.
AUGMENT_KEYS = ("random_resized_crop", "random_crop", "horizontal_flip", "random_affine",
                "color_jitter")

#: Random numbers drawn per image (fixed slots, so switching one operation on or off does not
#: change the draws of the others): 10 candidate crop boxes (area, log aspect ratio), the
#: crop's position, the shift of a padded crop, flip, four colour factors.
_ATTEMPTS = 10
_CROP = 0
_POSITION = _CROP + 2 * _ATTEMPTS
_SHIFT = _POSITION + 2
_FLIP = _SHIFT + 2
_JITTER = _FLIP + 1
N_DRAWS = _JITTER + 4
#: A random affine map's draws (angle, translation x and y, scale, shear) follow in columns
#: ``N_DRAWS..``, from their own stream: adding the operation changes no other draw.
_AFFINE = N_DRAWS
N_AFFINE_DRAWS = 5

_RRC_DEFAULTS = {"scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3]}
_JITTER_KEYS = ("brightness", "contrast", "saturation", "hue")
_AFFINE_DEFAULTS = {"degrees": 0.0, "translate": [0.0, 0.0], "scale": [1.0, 1.0], "shear": 0.0}


def _pair(value: Any, where: str, low: float, high: float | None = None) -> tuple[float, float]:
    if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            or not low <= value[0] <= value[1] or (high is not None and value[1] > high)):
        bound = f" and <= {high}" if high is not None else ""
        raise SettingError(f"{where} must be [low, high] with {low} <= low <= high{bound}, "
                           f"got {value!r}.")
    return float(value[0]), float(value[1])


def _number(value: Any, where: str, low: float, high: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise SettingError(f"{where} must be a number in [{low}, {high}], got {value!r}.")
    return float(value)


def check_augment(spec: Mapping[str, Any] | None, where: str = "augment") -> dict[str, Any]:
    """``spec`` with defaults filled in and every value checked; errors name the key.

    Example:
        >>> check_augment({"horizontal_flip": True, "random_crop": 4})
        {'random_crop': {'padding': 4}, 'horizontal_flip': 0.5}
        >>> check_augment({"flip": 0.5})
        Traceback (most recent call last):
        ...
        sharebone.errors.SettingError: augment: unknown key(s) ['flip']; valid: ...
    """
    if not spec:
        return {}
    if not isinstance(spec, Mapping):
        raise SettingError(f"{where} must be a mapping of {list(AUGMENT_KEYS)}, got {spec!r}.")
    unknown = sorted(set(spec) - set(AUGMENT_KEYS))
    if unknown:
        raise SettingError(f"{where}: unknown key(s) {unknown}; valid: {list(AUGMENT_KEYS)}.")
    out: dict[str, Any] = {}
    rrc = spec.get("random_resized_crop")
    if rrc:
        rrc = dict(_RRC_DEFAULTS, **(rrc if isinstance(rrc, Mapping) else {}))
        unknown = sorted(set(rrc) - set(_RRC_DEFAULTS))
        if unknown:
            raise SettingError(f"{where}.random_resized_crop: unknown key(s) {unknown}; valid: "
                               "['scale', 'ratio'].")
        scale = _pair(rrc["scale"], f"{where}.random_resized_crop.scale", 1e-6, 1.0)
        ratio = _pair(rrc["ratio"], f"{where}.random_resized_crop.ratio", 1e-6)
        out["random_resized_crop"] = {"scale": list(scale), "ratio": list(ratio)}
    crop = spec.get("random_crop")
    if crop:
        padding = crop.get("padding") if isinstance(crop, Mapping) else crop
        if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
            raise SettingError(f"{where}.random_crop.padding must be an int >= 0, got "
                               f"{padding!r}.")
        if "random_resized_crop" in out:
            raise SettingError(f"{where}: random_resized_crop and random_crop both crop; choose "
                               "one.")
        out["random_crop"] = {"padding": padding}
    flip = spec.get("horizontal_flip")
    if flip:
        out["horizontal_flip"] = 0.5 if flip is True else _number(
            flip, f"{where}.horizontal_flip (a probability)", 0.0, 1.0)
    affine = spec.get("random_affine")
    if affine:
        out["random_affine"] = _check_affine(affine, f"{where}.random_affine")
    jitter = spec.get("color_jitter")
    if jitter:
        _check_keys(jitter, _JITTER_KEYS, f"{where}.color_jitter")
        out["color_jitter"] = {
            key: _number(jitter.get(key, 0.0), f"{where}.color_jitter.{key}", 0.0,
                         0.5 if key == "hue" else math.inf) for key in _JITTER_KEYS}
    return out


def _check_keys(spec: Any, keys: Sequence[str], where: str) -> None:
    """``spec`` is a mapping whose keys are all among ``keys``."""
    if not isinstance(spec, Mapping):
        raise SettingError(f"{where} must be a mapping of {list(keys)}, got {spec!r}.")
    unknown = sorted(set(spec) - set(keys))
    if unknown:
        raise SettingError(f"{where}: unknown key(s) {unknown}; valid: {list(keys)}.")


def _check_affine(spec: Any, where: str) -> dict[str, Any]:
    _check_keys(spec, list(_AFFINE_DEFAULTS), where)
    spec = dict(_AFFINE_DEFAULTS, **spec)
    translate = spec["translate"]
    if isinstance(translate, int | float) and not isinstance(translate, bool):
        translate = [translate, translate]
    if (not isinstance(translate, Sequence) or isinstance(translate, str) or len(translate) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1
                       for v in translate)):
        raise SettingError(f"{where}.translate must be [fx, fy], fractions of the image's side "
                           f"in [0, 1], got {spec['translate']!r}.")
    return {"degrees": _number(spec["degrees"], f"{where}.degrees", 0.0, 180.0),
            "translate": [float(v) for v in translate],
            "scale": list(_pair(spec["scale"], f"{where}.scale", 1e-6)),
            "shear": _number(spec["shear"], f"{where}.shear (degrees)", 0.0, 89.0)}


def check_split_augment(augment: Mapping[str, Any] | None,
                        splits: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A family's ``augment`` block (split -> operations), each checked; a split the family
    does not have is refused."""
    out = {str(s): check_augment(a, f"augment.{s}") for s, a in (augment or {}).items() if a}
    unknown = sorted(set(out) - set(splits))
    if unknown:
        raise SettingError(f"augment names split(s) {unknown}; this task has "
                           f"{sorted(splits)}.")
    return out


def check_normalize(spec: Mapping[str, Any] | None, channels: int,
                    where: str = "normalize") -> dict[str, list[float]] | None:
    """``{"mean": [...], "std": [...]}`` with one value per channel (or one for all)."""
    if not spec:
        return None
    if not isinstance(spec, Mapping) or set(spec) != {"mean", "std"}:
        raise SettingError(f"{where} must be {{mean: [...], std: [...]}}, got {spec!r}.")
    out = {}
    for key in ("mean", "std"):
        value = spec[key]
        value = [value] if isinstance(value, int | float) else list(value)
        if len(value) not in (1, channels) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise SettingError(f"{where}.{key} must be {channels} numbers (one per channel), got "
                               f"{spec[key]!r}.")
        out[key] = [float(v) for v in value] * (channels if len(value) == 1 else 1)
    if min(out["std"]) <= 0:
        raise SettingError(f"{where}.std must be > 0, got {spec['std']!r}.")
    return out


def _blend(image: torch.Tensor, other: torch.Tensor | None, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` with a factor per image (``[B, 1, 1, 1]``), in place (``image``
    is a tensor this module made); ``other=None`` blends with black."""
    image.mul_(factor)
    if other is not None:
        image.add_(other * (1.0 - factor))
    return image.clamp_(0.0, 1.0)


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    r, g, b = rgb.unbind(-3)
    high, _ = rgb.max(-3)
    low, _ = rgb.min(-3)
    delta = high - low
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(high == r, ((g - b) / safe) % 6,
                      torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    saturation = torch.where(high > 0, delta / torch.where(high > 0, high, torch.ones_like(high)),
                             torch.zeros_like(high))
    return torch.stack([hue, saturation, high], -3)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(-3)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], -3)
    return v.unsqueeze(-3) - (v * s).unsqueeze(-3) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _geometry(spec: dict[str, Any], draws: torch.Tensor, height: int,
              width: int) -> torch.Tensor | None:
    """Per-image affine maps ``[B, 2, 3]`` from output to input coordinates (``[-1, 1]``)."""
    rrc, crop, flip, affine = (spec.get(k) for k in ("random_resized_crop", "random_crop",
                                                     "horizontal_flip", "random_affine"))
    if not (rrc or crop or flip or affine):
        return None
    n = draws.shape[0]
    scale_x = torch.ones(n, dtype=draws.dtype, device=draws.device)
    scale_y = scale_x.clone()
    shift_x, shift_y = torch.zeros_like(scale_x), torch.zeros_like(scale_x)
    if rrc:
        # torchvision's RandomResizedCrop.get_params: up to 10 (area, log-ratio) draws, the
        # first whose box fits; the box's sides as fractions of the image's.
        (s_lo, s_hi), (r_lo, r_hi) = rrc["scale"], rrc["ratio"]
        u = draws[:, _CROP:_CROP + 2 * _ATTEMPTS].view(n, _ATTEMPTS, 2)
        area = s_lo + (s_hi - s_lo) * u[..., 0]
        ratio = torch.exp(math.log(r_lo) + (math.log(r_hi) - math.log(r_lo)) * u[..., 1])
        aspect = width / height
        w = torch.sqrt(area * ratio / aspect)
        h = torch.sqrt(area / ratio * aspect)
        fits = (w <= 1) & (h <= 1)
        first = torch.where(fits.any(1), fits.float().argmax(1), -1)
        take = first.clamp(min=0).unsqueeze(1)
        w = torch.where(first >= 0, w.gather(1, take).squeeze(1), torch.ones_like(scale_x))
        h = torch.where(first >= 0, h.gather(1, take).squeeze(1), torch.ones_like(scale_x))
        # Whole pixels, as torchvision crops them.
        w = (w * width).round().clamp(min=1) / width
        h = (h * height).round().clamp(min=1) / height
        left = torch.floor(draws[:, _POSITION] * (((1 - w) * width).round() + 1)) / width
        top = torch.floor(draws[:, _POSITION + 1] * (((1 - h) * height).round() + 1)) / height
        scale_x, scale_y = w, h
        shift_x, shift_y = 2 * left + w - 1, 2 * top + h - 1
    if crop:
        p = crop["padding"]
        dx = torch.floor(draws[:, _SHIFT] * (2 * p + 1)) - p
        dy = torch.floor(draws[:, _SHIFT + 1] * (2 * p + 1)) - p
        shift_x, shift_y = 2 * dx / width, 2 * dy / height
    if flip:
        scale_x = torch.where(draws[:, _FLIP] < flip, -scale_x, scale_x)
    theta = torch.zeros(n, 2, 3, dtype=draws.dtype, device=draws.device)
    theta[:, 0, 0], theta[:, 0, 2] = scale_x, shift_x
    theta[:, 1, 1], theta[:, 1, 2] = scale_y, shift_y
    if affine:
        # Output -> affine's input -> crop's input: the crop's map after the affine's inverse.
        inverse = _affine_inverse(affine, draws[:, _AFFINE:_AFFINE + N_AFFINE_DRAWS], height,
                                  width)
        theta = torch.cat([theta[:, :, :2] @ inverse[:, :, :2],
                           theta[:, :, :2] @ inverse[:, :, 2:] + theta[:, :, 2:]], 2)
    return theta


def _affine_inverse(affine: dict[str, Any], u: torch.Tensor, height: int,
                    width: int) -> torch.Tensor:
    """``[B, 2, 3]`` maps from output to input coordinates (``[-1, 1]``) of random affine maps
    about the image centre: ``out = s R(angle) Shear_x (in) + t``, the parameters drawn as
    torchvision's ``RandomAffine`` draws them (translation in whole pixels)."""
    angle = torch.deg2rad((2 * u[:, 0] - 1) * affine["degrees"])
    fx, fy = affine["translate"]
    tx = torch.round((2 * u[:, 1] - 1) * fx * width)
    ty = torch.round((2 * u[:, 2] - 1) * fy * height)
    low, high = affine["scale"]
    scale = low + (high - low) * u[:, 3]
    shear = torch.tan(torch.deg2rad((2 * u[:, 4] - 1) * affine["shear"]))
    cos, sin = torch.cos(angle), torch.sin(angle)
    # The forward map in pixels, M = s [[cos, -sin], [sin, cos]] [[1, -shear], [0, 1]]:
    m = torch.stack([torch.stack([cos, -cos * shear - sin], 1),
                     torch.stack([sin, cos - sin * shear], 1)], 1) * scale.view(-1, 1, 1)
    # In [-1, 1] coordinates x_n = D^-1 x_px, D = diag(W/2, H/2): in_n = D^-1 M^-1 (D out_n - t).
    d = torch.tensor([width / 2, height / 2], dtype=u.dtype, device=u.device)
    m_inv = torch.linalg.inv(m)
    linear = m_inv * d.view(1, 1, 2) / d.view(1, 2, 1)
    shift = -(m_inv @ torch.stack([tx, ty], 1).unsqueeze(2)) / d.view(1, 2, 1)
    return torch.cat([linear, shift], 2)


def augment_images(images: torch.Tensor, draws: torch.Tensor | None, spec: Mapping[str, Any],
                   normalize: Mapping[str, Sequence[float]] | None = None) -> torch.Tensor:
    """``images`` (uint8 or float in ``[0, 1]``, ``[B, C, H, W]``) augmented and normalised:
    float32, on their device.

    Args:
        draws: ``[B, N_DRAWS]`` uniform numbers in ``[0, 1)``, the random parameters of each
            image (``[B, N_DRAWS + N_AFFINE_DRAWS]`` with ``random_affine``; None when
            ``spec`` is empty).
        spec: a checked ``augment`` block (:func:`check_augment`).
        normalize: ``{"mean", "std"}`` per channel (:func:`check_normalize`), or None.
    """
    x = TF.to_dtype(images, torch.float32, scale=True) if images.dtype == torch.uint8 \
        else images.float().clone()  # a copy: the steps below work in place
    if spec:
        draws = draws.to(device=x.device, dtype=torch.float32)
        theta = _geometry(dict(spec), draws, x.shape[-2], x.shape[-1])
        if theta is not None:
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            # Shifts by whole pixels and mirroring land on pixel centres: nearest is exact
            # there (and cheaper); a resized crop or an affine map needs bilinear.
            mode = "bilinear" if spec.get("random_resized_crop") or spec.get(
                "random_affine") else "nearest"
            x = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
        jitter = spec.get("color_jitter")
        if jitter:
            x = _color_jitter(x, draws[:, _JITTER:_JITTER + 4], jitter)
    if normalize:
        x = TF.normalize(x, normalize["mean"], normalize["std"], inplace=True)
    return x


def _color_jitter(x: torch.Tensor, u: torch.Tensor, jitter: Mapping[str, float]) -> torch.Tensor:
    def factor(i: int, amount: float) -> torch.Tensor:
        low = max(0.0, 1.0 - amount)
        return (low + (1.0 + amount - low) * u[:, i]).view(-1, 1, 1, 1)

    rgb = x.shape[-3] == 3
    if jitter["brightness"]:
        x = _blend(x, None, factor(0, jitter["brightness"]))
    if jitter["contrast"]:
        gray = TF.rgb_to_grayscale(x) if rgb else x
        x = _blend(x, gray.mean(dim=(-3, -2, -1), keepdim=True), factor(1, jitter["contrast"]))
    if jitter["saturation"] and rgb:
        x = _blend(x, TF.rgb_to_grayscale(x, num_output_channels=3),
                   factor(2, jitter["saturation"]))
    if jitter["hue"] and rgb:
        hsv = _rgb_to_hsv(x)
        shift = (2 * u[:, 3] - 1) * jitter["hue"]
        hue = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
        x = _hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], 1)).clamp_(0.0, 1.0)
    return x


class EpisodeTransform:
    """What turns a split's uint8 episodes into the model's input on its device.

    Args:
        seed, split: the episode sampler's; with an episode's index they fix its random
            augmentation parameters.
        augment: this split's ``augment`` block (:func:`check_augment`), or None.
        normalize: ``{"mean", "std"}`` for every split (:func:`check_normalize`), or None.

    Example:
        >>> from sharebone.data.episodes import EpisodeSampler
        >>> images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
        >>> transform = EpisodeTransform(0, "train", {"horizontal_flip": 0.5})
        >>> sampler = EpisodeSampler(images, torch.arange(40) // 10, 2, 1, 3,
        ...                          transform=transform)
        >>> batch = sampler.prepare(sampler.batch(range(4)))
        >>> batch.support.dtype, torch.equal(batch.query[2],
        ...                                  sampler.prepare(sampler.batch([2])).query[0])
        (torch.float32, True)
    """

    def __init__(self, seed: int, split: str, augment: Mapping[str, Any] | None = None,
                 normalize: Mapping[str, Sequence[float]] | None = None) -> None:
        self.seed, self.split = int(seed), split
        self.augment = check_augment(augment, f"augment.{split}")
        self.normalize = dict(normalize) if normalize else None

    def __bool__(self) -> bool:
        return bool(self.augment or self.normalize)

    def draws(self, index: torch.Tensor, per_item: int) -> torch.Tensor:
        """``[len(index) * per_item, N_DRAWS]`` uniform numbers (``+ N_AFFINE_DRAWS`` columns
        with ``random_affine``): image ``j`` of item ``index[i]`` is row ``i * per_item + j``."""
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1).cpu()
        u = uniform(self.seed, self.split, index, AUGMENT_STREAM, (per_item, N_DRAWS))
        u = u.view(-1, N_DRAWS)
        if "random_affine" not in self.augment:
            return u
        affine = uniform(self.seed, self.split, index, AFFINE_STREAM, (per_item, N_AFFINE_DRAWS))
        return torch.cat([u, affine.view(-1, N_AFFINE_DRAWS)], 1)

    def images(self, images: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """``[T, M, C, H, W]`` images of ``T`` items (episodes, batches) numbered ``index``."""
        t, m = images.shape[:2]
        if index is None:
            index = torch.arange(t)
        draws = self.draws(index, m) if self.augment else None
        flat = augment_images(images.flatten(0, 1), draws, self.augment, self.normalize)
        return flat.view(t, m, *flat.shape[1:])

    def __call__(self, episode: Episode) -> Episode:
        single = episode.support.dim() == 4
        support, query = ((episode.support.unsqueeze(0), episode.query.unsqueeze(0)) if single
                          else (episode.support, episode.query))
        n_support = support.shape[1]
        index = None if episode.index is None else episode.index.reshape(-1)
        both = self.images(torch.cat([support, query], 1), index)
        support, query = both[:, :n_support], both[:, n_support:]
        if single:
            support, query = support[0], query[0]
        return Episode(support, episode.support_labels, query, episode.query_labels,
                       episode.classes, episode.index)

    def __repr__(self) -> str:
        return (f"EpisodeTransform(split={self.split!r}, augment={self.augment}, "
                f"normalize={self.normalize})")
