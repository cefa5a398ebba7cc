"""First-order baselines through torch.optim (SGD, Adam, AdamW): backward, step, free the gradients.

Weight decay skips biases and layer norms, as HF Trainer (the papers' FT baselines) does.

16-bit runs, as MeZO's FT row ran them (finetune.sh: HF Trainer `--fp16`, i.e. torch AMP):
- precision.master_weights with 16-bit weights: the trained parameters are held in fp32 (the model as HF
  loads it) and the training forward runs under torch.autocast in the weights' dtype, so the matmuls run
  in 16-bit while the optimizer steps fp32 weights with fp32 gradients and state. Frozen parameters (the
  base model under PEFT) stay 16-bit. Evaluation runs the fp32 weights without autocast (HF evaluates
  under autocast too: only the evaluation's rounding differs).
- precision.loss_scaling=dynamic (auto: fp16): the loss is scaled before backward, the gradients unscaled,
  and a step with non-finite gradients skipped with the scale lowered (loss_scaling.py, GradScaler's rule).
- precision.grad_clip: clipping of the unscaled gradients before the step (HF Trainer: 1.0; clip_gradients:
  clip_grad_norm_'s rule, its norm summed in float64).
Plain fp16 weights without master weights are refused: Adam's eps (1e-8) and small second moments flush to
zero in fp16 (one step left 180,267 weights non-finite, issue 13), and no reference ran them so.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import Diverged, ZobenchError
from ..models import trained_parameters
from ..parallel.sharded_checkpoint import local, shard_state_like_params
from .base import Optimizer
from .engine import decays
from .hf_adamw import HFAdamW
from .loss_scaling import scaler_for

log = logging.getLogger(__name__)
# HFAdamW: HF Trainer's own AdamW (adamw_hf), which MeZO's finetune.sh ran (hf_adamw.py)
TORCH_OPTIMIZERS = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "HFAdamW": HFAdamW}


class TorchOptimizer(Optimizer):
    # this rank's share of each batch in train.grad_accumulation micro-batches (zobench/parallel/first_order.py
    # RankShare); None: the whole batch at once (one process, no accumulation)
    share = None
    accumulates = True

    @dataclass(frozen=True)
    class Settings(Optimizer.Settings):
        torch_class: str  # one of TORCH_OPTIMIZERS
        kwargs: Mapping  # the torch optimizer's other arguments (betas, eps, momentum, ...)

    @classmethod
    def check_settings(cls, settings, prefix: str) -> None:
        super().check_settings(settings, prefix)
        from .settings import check_numbers

        name = settings.torch_class
        if name not in TORCH_OPTIMIZERS:
            raise ZobenchError(f"{prefix}.torch_class must be one of {', '.join(TORCH_OPTIMIZERS)}, got {name!r:.60}")
        accepted = set(inspect.signature(TORCH_OPTIMIZERS[name]).parameters) - {"params", "lr", "weight_decay"}
        unknown = sorted(set(settings.kwargs) - accepted)
        if unknown:
            raise ZobenchError(f"{prefix}.kwargs.{unknown[0]} is not an argument of {name} (lr and weight_decay "
                               f"are {prefix}.lr, {prefix}.weight_decay); it takes: {', '.join(sorted(accepted))}")
        check_numbers(settings.kwargs, f"{prefix}.kwargs")

    def clip_of(self, settings) -> float | None:
        """The method's own gradient clipping (precision.grad_clip, when set, wins): none for torch.optim's."""
        return None

    def __init__(self, model, loss_fn, settings, *, seed: int, total_steps: int, precision=None):
        super().__init__(model, loss_fn, settings, seed=seed, total_steps=total_steps, precision=precision)
        name = settings.torch_class
        policy = self.precision
        named = list(trained_parameters(model).items())
        self.autocast_dtype = policy.weights if policy.half and policy.master_weights else None
        if self.autocast_dtype is not None:
            to_fp32(named)
        elif policy.weights == torch.float16:
            raise ZobenchError(
                f"optimizer.torch_class={name} on float16 weights needs fp32 master weights: add "
                f"precision.master_weights=true (HF Trainer --fp16: fp32 weights, fp16 autocast, loss scaling; "
                f"MeZO's FT row), or use dtype=float32, or optimizer=ip_sgd (in-place, fp32 update arithmetic)")
        elif policy.half:
            log.warning("%s on %s weights without master weights: updates smaller than the weights' rounding "
                        "step are lost; precision.master_weights=true keeps fp32 weights", name,
                        str(policy.weights).removeprefix("torch."))
        self.scaler = scaler_for(policy)
        # a method's own clipping (head-tuning: HF Trainer's 1.0); precision.grad_clip wins
        self.clip = policy.grad_clip if policy.grad_clip is not None else self.clip_of(settings)
        self.grad_norm: float | None = None  # the last step's unscaled gradient norm, before clipping
        wd = self.weight_decay
        groups = [{"params": [p for n, p in named if decays(n)], "weight_decay": wd},
                  {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0}]
        self.params = [p for _, p in named]
        extra = dict(settings.kwargs)
        if "betas" in extra:
            extra["betas"] = tuple(extra["betas"])
        self.optimizer = TORCH_OPTIMIZERS[name](groups, lr=self.base_lr, **extra)

    def _forward_context(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.params[0].device.type, dtype=self.autocast_dtype)

    def batches(self, lengths, batch_size, seed):
        batches = super().batches(lengths, batch_size, seed)
        return batches if self.share is None else map(self.share.split, batches)

    def _step(self, batch) -> float:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        if self.share is None:
            value, parts = self._backward(batch), 1
        else:  # this rank's micro-batches: each gradient as its own rank's would be (RankShare.accumulate)
            value, parts = self.share.accumulate(batch, self._backward), len(batch)
        if not math.isfinite(value):
            raise Diverged(f"loss is {value}")
        # once per step, on the summed gradients: the loss scale and the parts' count undone (as N ranks' average)
        factor = (1.0 / self.scaler.scale if self.scaler is not None else 1.0) / parts
        if factor != 1.0:
            self._unscale(factor)
        if self.scaler is not None or self.clip is not None:
            self.grad_norm = clip_gradients(self.params, self.clip)
            if not math.isfinite(self.grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is None:
                    raise Diverged(f"gradient norm is {self.grad_norm}")
                self.scaler.update(overflow=True)  # GradScaler: skip the step, lower the scale
                return value
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update(overflow=False)
        return value

    def _backward(self, batch, weight: float = 1.0) -> float:
        """Forward and backward of `batch`'s mean loss times `weight` (and the loss scale); returns that mean."""
        with self._forward_context():
            loss = self.loss_fn(batch)
        value = float(loss.detach())
        if weight != 1.0:
            loss = loss * weight
        if self.scaler is not None:
            loss = loss.float() * self.scaler.scale
        loss.backward()
        return value

    @torch.no_grad()
    def _unscale(self, factor: float) -> None:
        """The gradients times `factor`."""
        for param in self.params:
            if param.grad is not None:
                param.grad.mul_(factor)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.scaler is not None:
            state["loss_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        shard_state_like_params(self.optimizer)  # FSDP2: the loaded local shards laid out as the parameters
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])


NORM_CHUNK = 2**22  # elements squared at a time in float64 (32 MiB) by clip_gradients


@torch.no_grad()
def clip_gradients(params, max_norm: float | None) -> float:
    """The gradients' total norm, and the gradients scaled down to `max_norm` if above it (None: measured only),
    as torch.nn.utils.clip_grad_norm_ does (coefficient max_norm / (norm + 1e-6)), but with the squares summed
    in float64 from each rank's own shard (FSDP2's DTensor gradients; all-reduced), so the norm is the same to
    the last bit however the gradients are sharded. torch's fp32 norm rounds otherwise over shards: a clipping
    coefficient an ulp off moves the fp32 master weights an ulp, which the next fp16 cast can turn into a
    whole fp16 ulp (issue 20: FSDP2 4.3e-6 from DDP after 5 fp16-regime Adam steps; 0 with this)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    device = local(grads[0]).device
    sums = {kind: torch.zeros((), dtype=torch.float64, device=device) for kind in ("shards", "whole")}
    for grad in grads:
        mine = local(grad)
        for part in mine.reshape(-1).split(NORM_CHUNK):
            sums["whole" if mine is grad else "shards"] += part.double().square().sum().to(device)
    if any(local(grad) is not grad for grad in grads):  # every rank adds the other ranks' shards
        import torch.distributed as dist

        dist.all_reduce(sums["shards"])
    norm = math.sqrt(float(sums["shards"] + sums["whole"]))
    coefficient = max_norm / (norm + 1e-6) if max_norm is not None else 1.0
    if coefficient < 1.0:  # a non-finite norm stays unclipped: the caller skips the step
        for grad in grads:
            grad.mul_(coefficient)
    return norm


@torch.no_grad()
def to_fp32(named) -> None:
    """Master weights: the trained parameters become fp32 in place (same Parameter objects, so tied
    weights stay tied and the runner's checkpoints and best-weights copies see the fp32 values)."""
    for _, param in named:
        if param.dtype != torch.float32:  # already fp32 where zobench/parallel made them so before sharding
            param.data = param.data.float()
