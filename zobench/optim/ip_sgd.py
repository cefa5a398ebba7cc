"""IP-SGD: in-place SGD, the memory-lean first-order baseline of Addax (Li et al., ICLR 2025, §2).

Each parameter is updated the moment its gradient is complete during backward, θ ← θ − lr·(g + wd·θ)
(torch.optim.SGD's arithmetic, momentum 0), and its gradient is freed at once: no full set of gradients
is ever held, only the activations of the batch. The hook is torch's post-accumulate-grad hook; a tied
weight (OPT's embedding = LM head, one Parameter used twice) gets it once, after both uses have
accumulated into its gradient, so it is updated with its full gradient. Every module that reads a
parameter runs its backward before that parameter's gradient is complete, so an update never changes
a value that backward still needs.

16-bit weights, as LOMO (IP-SGD's reference; OpenLMLab/LOMO lomo/src/lomo.py) runs them:
- the update arithmetic is per parameter in precision.update_dtype: with float32, θ and g of one
  parameter are upcast inside its hook, θ − lr·(g/scale·c + wd·θ) is computed in fp32 and rounded once into
  the 16-bit θ (lomo.py fuse_update, ~lines 86-102): the correctly rounded update. (What is below half a
  rounding step of a 16-bit weight is still lost in that one rounding: only fp32 weights keep it.)
  Only a chunk of one parameter (CHUNK elements) is ever in fp32: never a full fp32 model nor gradient set.
- with loss scaling (fp16) or clipping, an in-place step cannot be undone once an overflow shows up half
  way through backward. LOMO's rule (lomo.py grad_norm, ~lines 177-209; lomo_trainer.py ~lines 114-172):
  a first backward only measures the unscaled gradients' norm and spots an overflow, freeing each
  gradient as it goes; on overflow the whole step is skipped (no weight changes) and the scale lowered,
  otherwise the clip coefficient c = min(1, clip/(norm + 1e-6)) is fixed and a second backward applies
  the updates. LOMO runs a second forward for that pass; we keep the first pass's graph instead
  (retain_graph), so the second pass applies exactly the gradient the first one checked (same dropout)
  at no extra forward and no extra peak (the activations are held during a single backward anyway).
"""

from __future__ import annotations

import math

import torch

from ..errors import Diverged
from ..models import trained_parameters
from .base import Optimizer
from .engine import decays
from .loss_scaling import scaler_for

CHUNK = 1 << 20  # elements upcast to fp32 at a time (4 MiB): the transient cost of fp32 arithmetic


class InPlaceSGDStep:
    """In-place SGD steps on `model` under the run's precision policy; owns the loss scaler."""

    def __init__(self, model, precision):
        self.model = model
        self.update_dtype = precision.dtype_of(precision.update_dtype)
        self.clip = precision.grad_clip
        self.scaler = scaler_for(precision)
        self.grad_norm: float | None = None  # the last measured (unscaled, unclipped) gradient norm
        # under torchrun (parallel/in_place.py): each gradient summed over the ranks before it is measured or
        # applied, so every rank steps with the whole batch's gradient; None in one process
        self.reduce_gradient = None

    def __call__(self, loss_fn, batch, lr: float, weight_decay: float = 0.0) -> float:
        """One forward and backward on `batch`, each gradient applied and freed as soon as it is complete."""
        self.model.train()
        named = list(trained_parameters(self.model).items())
        for _, param in named:
            param.grad = None  # the hooks must see this step's gradient alone
        loss = loss_fn(batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise Diverged(f"loss is {value}")
        scale = self.scaler.scale if self.scaler is not None else 1.0
        scaled = loss * scale if scale != 1.0 else loss
        coefficient = 1.0
        if self.scaler is not None or self.clip is not None:  # LOMO's first pass: the norm, and any overflow
            norm = self._norm_pass(named, scaled, scale)
            self.grad_norm = norm
            if not math.isfinite(norm):
                if self.scaler is None:
                    raise Diverged(f"gradient norm is {norm}")
                self.scaler.update(overflow=True)  # skip: not one weight has changed
                return value
            if self.clip is not None:
                coefficient = min(1.0, self.clip / (norm + 1e-6))  # lomo.py grad_norm, ~line 207
        self._update_pass(named, scaled, lr, weight_decay, coefficient / scale)
        if self.scaler is not None:
            self.scaler.update(overflow=False)
        return value

    def _norm_pass(self, named, scaled: torch.Tensor, scale: float) -> float:
        squares: list[torch.Tensor] = []

        @torch.no_grad()
        def measure(param: torch.Tensor) -> None:
            squares.extend(torch.linalg.vector_norm(part, dtype=torch.float32).square()
                           for part in chunks(self._gradient(param)))
            param.grad = None

        self._backward(named, lambda name: measure, scaled, retain_graph=True)
        return math.sqrt(float(sum_on_one_device(squares))) / scale

    def _update_pass(self, named, scaled: torch.Tensor, lr: float, weight_decay: float, factor: float) -> None:
        def hook_for(name: str):
            wd = weight_decay if decays(name) else 0.0

            @torch.no_grad()
            def apply(param: torch.Tensor) -> None:
                grad = self._gradient(param)
                param.grad = None
                self.apply(param, grad, lr, wd, factor)
            return apply

        self._backward(named, hook_for, scaled, retain_graph=False)

    def _gradient(self, param: torch.Tensor) -> torch.Tensor:
        return param.grad if self.reduce_gradient is None else self.reduce_gradient(param.grad)

    def apply(self, theta: torch.Tensor, grad: torch.Tensor, lr: float, wd: float, factor: float) -> None:
        """θ ← θ − lr·(factor·g + wd·θ) for one parameter (or its shard, parallel/in_place.py), in update_dtype and
        rounded once into θ's dtype; `grad` is overwritten."""
        if theta.dtype == self.update_dtype:
            _sgd_update(theta, grad, lr, wd, factor)
            return
        whole = not (theta.is_contiguous() and grad.is_contiguous())
        pairs = [(theta, grad)] if whole else zip(chunks(theta), chunks(grad))
        for piece, part in pairs:  # fp32 a chunk at a time
            upcast = piece.to(self.update_dtype)
            _sgd_update(upcast, part.to(self.update_dtype), lr, wd, factor)
            piece.copy_(upcast)  # the one rounding into the weights' dtype

    @staticmethod
    def _backward(named, hook_for, scaled: torch.Tensor, retain_graph: bool) -> None:
        handles = [param.register_post_accumulate_grad_hook(hook_for(name)) for name, param in named]
        try:
            scaled.backward(retain_graph=retain_graph)
        finally:
            for handle in handles:
                handle.remove()

    def state_dict(self) -> dict:
        return {"loss_scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])


def sum_on_one_device(parts: list[torch.Tensor]) -> torch.Tensor:
    """The sum of per-parameter figures, on the first one's device: a model split over GPUs (device_map)
    has them on several, which torch.stack refuses. One scalar copied per chunk."""
    first = parts[0].device
    return torch.stack([part.to(first) for part in parts]).sum()


def _sgd_update(theta: torch.Tensor, grad: torch.Tensor, lr: float, wd: float, factor: float) -> None:
    """θ ← θ − lr·(factor·g + wd·θ), each operation rounded into θ's dtype; `grad` is overwritten."""
    if theta.dtype in (torch.float16, torch.bfloat16):  # update_dtype=weights on 16-bit weights
        for t, g in zip(chunks(theta), chunks(grad)) if theta.is_contiguous() and grad.is_contiguous() \
                else [(theta, grad)]:
            _sgd_update_16bit(t, g, lr, wd, factor)
        return
    if factor != 1.0:
        grad.mul_(factor)  # unscale and clip: 1/scale · c
    if wd != 0.0:
        grad.add_(theta, alpha=wd)  # torch.optim.SGD: d_p = g + wd·θ
    theta.add_(grad, alpha=-lr)


def _sgd_update_16bit(theta: torch.Tensor, grad: torch.Tensor, lr: float, wd: float, factor: float) -> None:
    """The same three operations as torch.optim.SGD's on 16-bit tensors on CUDA: each computed in fp32 with
    its scalar in fp32 (CUDA's opmath) and rounded once into the 16-bit tensor. CPU's 16-bit `add_` rounds
    alpha itself to 16 bits first (lr 1e-7 became 1.19e-7 in fp16), so the arithmetic is spelled out here."""
    theta32, grad32 = theta.float(), grad.float()
    if factor != 1.0:
        grad32 = grad32.mul_(factor).to(grad.dtype).float()
    if wd != 0.0:
        grad32 = grad32.add_(theta32, alpha=wd).to(grad.dtype).float()
    theta.copy_(theta32.add_(grad32, alpha=-lr))


def chunks(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Flat views of `tensor`, CHUNK elements each, so a 16-bit embedding matrix is never upcast whole."""
    return tensor.view(-1).split(CHUNK) if tensor.is_contiguous() else (tensor,)


class InPlaceSGD(Optimizer):
    def __init__(self, model, loss_fn, settings, *, seed: int, total_steps: int, precision=None):
        super().__init__(model, loss_fn, settings, seed=seed, total_steps=total_steps, precision=precision)
        self.in_place = InPlaceSGDStep(model, self.precision)

    def _step(self, batch) -> float:
        return self.in_place(self.loss_fn, batch, self.lr, self.weight_decay)

    def state_dict(self) -> dict:
        return {**super().state_dict(), **self.in_place.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.in_place.load_state_dict(state)
