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
- precision.grad_clip: clip_grad_norm_ on the unscaled gradients before the step (HF Trainer: 1.0).
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
from .base import Optimizer
from .engine import decays
from .hf_adamw import HFAdamW
from .loss_scaling import scaler_for

log = logging.getLogger(__name__)
# HFAdamW: HF Trainer's own AdamW (adamw_hf), which MeZO's finetune.sh ran (hf_adamw.py)
TORCH_OPTIMIZERS = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "HFAdamW": HFAdamW}


class TorchOptimizer(Optimizer):
    # under torchrun, this rank's share of each batch (zobench/parallel/first_order.py RankShare); None: all of it
    share = None

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
            _to_fp32(named)
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
        with self._forward_context():
            loss = self.loss_fn(batch)
        if self.share is not None:  # the whole batch's mean over the ranks (and its gradient)
            loss, value = self.share.weigh(loss, batch)
        else:
            value = float(loss.detach())
        if not math.isfinite(value):
            raise Diverged(f"loss is {value}")
        if self.scaler is not None:
            (loss.float() * self.scaler.scale).backward()
            self._unscale(1.0 / self.scaler.scale)
        else:
            loss.backward()
        if self.scaler is not None or self.clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip if self.clip is not None else math.inf)
            self.grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
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

    @torch.no_grad()
    def _unscale(self, factor: float) -> None:
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
        from ..parallel.sharded_checkpoint import shard_state_like_params

        shard_state_like_params(self.optimizer)  # FSDP2: the loaded local shards laid out as the parameters
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])


@torch.no_grad()
def _to_fp32(named) -> None:
    """Master weights: the trained parameters become fp32 in place (same Parameter objects, so tied
    weights stay tied and the runner's checkpoints and best-weights copies see the fp32 values)."""
    for _, param in named:
        if param.dtype != torch.float32:  # already fp32 where zobench/parallel made them so before sharding
            param.data = param.data.float()
