"""Numerical precision of the inner loop: mixed precision checks.

``trainer.precision=bf16-mixed`` runs Lightning's ``training_step`` under
:func:`torch.autocast` with bfloat16. For the MAML family that means: the support and query
passes run in bf16 (convolutions and matmuls), while parameters stay float32, their support
gradients come back in float32, the inner SGD step is taken with autocast off
(:func:`sharebone.adaptation.adapt`), and the meta-gradient accumulation
(:func:`sharebone.adaptation.accumulate_meta_gradients`) adds float32 gradients. bf16
has
float32's exponent range, so no loss scaling is needed.

float16 (``16-mixed``) is refused for the inner loop (:func:`check_autocast`): Lightning's
``GradScaler`` scales only the outer loss, while the inner loop's support gradients (and
per-task / per-chunk meta-gradients) are taken before any scaler sees them, unscaled, so small
gradients would silently underflow to zero in float16.
"""

from __future__ import annotations

import torch

__all__ = ["check_autocast", "check_bf16_supported"]


def check_autocast(device_type: str) -> None:
    """Refuse an inner loop under float16 autocast (see the module's docstring)."""
    if (torch.is_autocast_enabled(device_type)
            and torch.get_autocast_dtype(device_type) == torch.float16):
        raise RuntimeError(
            "float16 mixed precision (trainer.precision=16-mixed) cannot run the MAML family's "
            "inner loop: its support gradients (and per-task or per-chunk meta-gradients) are "
            "taken before Lightning's GradScaler could scale them, so they may underflow to "
            "zero in float16 without a warning. Use trainer.precision=bf16-mixed (float32's "
            "range, no scaling needed) or 32-true.")


def check_bf16_supported(precision: str | None, device: torch.device,
                         supported: bool | None = None) -> None:
    """Refuse ``bf16`` precision on a CUDA device without bfloat16 (there torch.autocast would
    only warn and run in float32, so the run would not be what its config says).
    ``supported``: whether it has bf16 (default: ask torch). CPUs always run bf16 autocast."""
    if precision is None or "bf16" not in str(precision) or device.type != "cuda":
        return
    if supported is None:
        supported = torch.cuda.is_bf16_supported()
    if not supported:
        raise RuntimeError(
            f"trainer.precision={precision} needs bfloat16, which this GPU "
            f"({torch.cuda.get_device_name(device) if torch.cuda.is_available() else device}) "
            "does not support. Use trainer.precision=32-true (with float32_matmul_precision="
            "high for TF32 on Ampere or newer).")
