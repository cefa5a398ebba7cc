"""The precision policy of a run, in one place: what each part of the arithmetic runs in.

Named in config (`precision:` in conf/config.yaml), recorded in metrics.json (`precision`), and read by the
optimizers (`Optimizer.precision`) and the loss (`Objective`). Each paper preset (conf/experiment/) names the
regime its reference code ran; zobench's own choices sit beside them, never silently in their place.

Fields (see conf/config.yaml for the values each takes):
  weights         the model's dtype (the run's `dtype`, resolved: float32 / float16 / bfloat16)
  zo_update       zeroth-order update numerics: `reference` (MeZO trainer.py: restore, then a separate
                  update, each rounded in the weights' dtype) | `fused` (zobench: restore and update in one
                  rounding, coefficients at full precision)
  loss_dtype      `weights` (MeZO/ZO-Bench utils.py: the loss from logits in the weights' dtype) | `float32`
  state_dtype     stateful ZO optimizers' state (ZO-Adam, ZO-SGD-MMT, AdaMeZO): `weights` | `float32`
  master_weights  first-order torch baselines: fp32 master weights under 16-bit autocast (HF Trainer --fp16)
  update_dtype    in-place first-order arithmetic (IP-SGD, Addax's FO half), per parameter: `float32` | `weights`
  loss_scaling    `dynamic` (a GradScaler-style scaler: overflow skips the step and lowers the scale) | `none`
  grad_clip       max gradient norm for first-order baselines, or null
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from .errors import ZobenchError

ZO_UPDATES = ("reference", "fused")
ZO_GENERATORS = ("device", "portable")
DTYPE_CHOICES = ("weights", "float32")
SCALINGS = ("auto", "dynamic", "none")
KEYS = ("name", "zo_update", "zo_generator", "loss_dtype", "state_dtype", "master_weights", "update_dtype",
        "loss_scaling", "grad_clip")


@dataclass(frozen=True)
class Precision:
    weights: torch.dtype = torch.float32
    zo_update: str = "fused"
    zo_generator: str = "device"
    loss_dtype: str = "float32"
    state_dtype: str = "float32"
    master_weights: bool = True
    update_dtype: str = "float32"
    loss_scaling: str = "none"
    grad_clip: float | None = None
    name: str = "zobench"

    @property
    def half(self) -> bool:
        """Are the weights 16-bit?"""
        return self.weights in (torch.float16, torch.bfloat16)

    def dtype_of(self, choice: str) -> torch.dtype:
        """`weights` -> the weights' dtype; `float32` -> torch.float32."""
        return self.weights if choice == "weights" else torch.float32

    def record(self) -> dict[str, Any]:
        """What metrics.json says of the regime that ran."""
        fields = asdict(self)
        fields["weights"] = str(self.weights).removeprefix("torch.")
        return fields


def from_config(node, weights: torch.dtype) -> Precision:
    """The policy of `node` (the config's `precision:`, every key set there: its defaults live in
    conf/config.yaml) for weights of dtype `weights`; None: the dataclass's own (an optimizer built alone)."""
    if node is None:
        return Precision(weights=weights)
    missing = [key for key in KEYS if key not in node]
    if missing:
        raise ZobenchError(f"precision.{missing[0]} is missing (conf/config.yaml sets every precision key)")
    policy = Precision(
        weights=weights, name=str(node["name"]), zo_update=str(node["zo_update"]),
        zo_generator=str(node["zo_generator"]), loss_dtype=str(node["loss_dtype"]),
        state_dtype=str(node["state_dtype"]), master_weights=bool(node["master_weights"]),
        update_dtype=str(node["update_dtype"]), loss_scaling=str(node["loss_scaling"]),
        grad_clip=None if node["grad_clip"] is None else float(node["grad_clip"]))
    _check(policy)
    if policy.loss_scaling == "auto":  # dynamic scaling where fp16 gradients can underflow, as AMP/LOMO do
        policy = replace(policy, loss_scaling="dynamic" if weights == torch.float16 else "none")
    return policy


def _check(policy: Precision) -> None:
    checks = [("zo_update", policy.zo_update, ZO_UPDATES), ("zo_generator", policy.zo_generator, ZO_GENERATORS),
              ("loss_dtype", policy.loss_dtype, DTYPE_CHOICES),
              ("state_dtype", policy.state_dtype, DTYPE_CHOICES), ("update_dtype", policy.update_dtype, DTYPE_CHOICES),
              ("loss_scaling", policy.loss_scaling, SCALINGS)]
    for key, value, valid in checks:
        if value not in valid:
            raise ZobenchError(f"precision.{key} must be one of {', '.join(valid)}, got {value}")
    if policy.grad_clip is not None and not policy.grad_clip > 0:
        raise ZobenchError(f"precision.grad_clip must be > 0 or null, got {policy.grad_clip}")
