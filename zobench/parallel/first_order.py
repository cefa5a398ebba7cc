"""First-order methods over more than one process (torchrun): FSDP2 or DDP around the model, each rank its
share of every batch, so that N ranks take the one-process step on the whole batch.

- `parallelize` wraps the model once it is built, before the method is: `parallel.fo=fsdp` shards it with
  FSDP2 (shard.py: a unit per decoder layer + the root, MeZO's `--fsdp "full_shard auto_wrap"`), `ddp`
  replicates it (DistributedDataParallel, where the model fits one device). The HF `--fp16` regime
  (precision.master_weights on 16-bit weights) keeps fp32 master weights sharded and computes in 16-bit under
  the optimizer's autocast, from fp32 gathers (the one-process arithmetic) or, `parallel.fsdp_param_dtype=
  weights`, fp16 ones (MixedPrecisionPolicy(param_dtype=fp16, reduce_dtype=fp32)).
- `RankShare` splits each step's examples over the ranks, each rank's share into train.grad_accumulation
  micro-batches (one process too), and weighs each micro-batch's mean loss by its share of the terms averaged
  (examples; an lm task's option tokens), so the summed (ranks: averaged) gradients are the gradient of the
  whole batch's mean (a short last batch included). One process with grad_accumulation=N takes the same
  micro-batches as N ranks: the same fp16 roundings of the weight gradients (README "More than one GPU").
  DDP skips the gradient all-reduce on all but a rank's last micro-batch (no_sync). FSDP2 reduce-scatters
  after every micro-batch: `set_requires_gradient_sync(False)` would hold every layer's unsharded fp32
  gradient until the last one, the whole model's gradients on each rank, the memory FSDP2 exists to save.
- The loss scaler's overflow and the clipping norm need no flag of their own: optim/first_order.clip_gradients
  sums the squares of every rank's shards (in float64, so the norm does not depend on the sharding), so an inf
  in any shard is an inf norm on every rank (DDP's gradients are all-reduced before it), and every rank skips
  the same step.
Only torch optimizers (Adam, SGD, AdamW, head-tuning) run here: IP-SGD updates each parameter inside backward,
before FSDP has reduced its gradient, so it is refused under torchrun. (Addax runs in a parallel.zo mode, its
first-order half as in_place.py says.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import ZobenchError
from ..models import trained_parameters
from ..objective import loss_terms
from ..optim.base import FIRST_ORDER
from ..optim.first_order import to_fp32
from .world import World


@dataclass(frozen=True)
class Parallel:
    """How the run's model is spread over the ranks: `forward` is the module whose call runs the whole model
    (FSDP2's root, whose hooks gather the shards, or DDP's wrapper), None in a one-process run."""

    world: World
    mode: str = "none"  # "none" | "fsdp" | "ddp"
    forward: torch.nn.Module | None = None

    def attach(self, method, micro_batches: int = 1, recording=None) -> None:
        """The method takes its rank's share of each batch in `micro_batches` parts (train.grad_accumulation); a
        one-process run without accumulation: the whole batch at once. `recording`: the run's RecordingLoss."""
        if self.mode != "none" or micro_batches > 1:
            no_sync = self.forward.no_sync if self.mode == "ddp" else None
            method.share = RankShare(self.world, micro_batches, no_sync, recording)


def check_method(method_class: type, fo_mode: str) -> None:
    """Refuses, in one line before anything loads, a first-order method that cannot run over the ranks."""
    from ..optim.first_order import TorchOptimizer

    if not issubclass(method_class, TorchOptimizer):
        raise ZobenchError(f"{method_class.__name__} updates each parameter in place during backward, before the "
                           f"ranks have reduced its gradient: under torchrun use optimizer=sgd (FSDP2, the same rule "
                           f"with a gradient held per shard) or run it in one process")
    if fo_mode == "ddp" and getattr(method_class, "freezes_after_build", False):
        raise ZobenchError(f"{method_class.__name__} freezes the body once built, after DDP has planned a gradient "
                           f"for every parameter: use parallel.fo=fsdp")


def check_batch(train, world: World) -> None:
    """Refuses, before anything loads, a batch too small for each rank to take its train.grad_accumulation
    micro-batches (`train`: spec.TrainSpec); a short last batch is checked as it comes (RankShare.split)."""
    need = world.size * train.grad_accumulation
    if train.batch_size < need:
        raise ZobenchError(f"train.batch_size={train.batch_size} cannot be split over {world.size} ranks x "
                           f"train.grad_accumulation={train.grad_accumulation} micro-batches: make it at least {need}")


def parallelize(model: torch.nn.Module, method_class: type, world: World, parallel, precision) -> Parallel:
    """Shards (fsdp) or replicates (ddp) `model` over the world's ranks when the method takes real gradients;
    a world of one, or a zeroth-order/evaluation method, gets the model as it is.

    In the 16-bit regime (master weights under autocast) FSDP2 gathers the fp32 master weights and autocast
    computes the matmuls in 16-bit, exactly as one process does (`fsdp_param_dtype: float32`); `weights`
    gathers 16-bit copies (MixedPrecisionPolicy(param_dtype=fp16, reduce_dtype=fp32), HF Trainer's FSDP
    --fp16): half the gathered bytes, but layer norms, embeddings and residual sums see fp16-rounded weights,
    so a run drifts further from the one-process one (opt-tiny, 5 Adam steps at lr 1e-5: losses 3.3e-5 apart,
    float32 gathers 6e-6; at lr 1e-3: 1.5e-3 and 1.2e-4)."""
    if not world.distributed or method_class.kind != FIRST_ORDER:
        return Parallel(world)
    check_method(method_class, parallel.fo)
    if precision.half and precision.master_weights:
        to_fp32(trained_parameters(model).items())  # the master weights are what FSDP shards (and DDP replicates): fp32 before wrapping
    if parallel.fo == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        wrapper = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return Parallel(world, "ddp", wrapper)
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from .shard import shard

    sixteen = precision.half and precision.master_weights and parallel.fsdp_param_dtype == "weights"
    policy = MixedPrecisionPolicy(param_dtype=precision.weights, reduce_dtype=torch.float32) if sixteen \
        else MixedPrecisionPolicy()
    # reshard after every forward, the root included: a unit left gathered after an evaluation would serve the
    # next forward its stale copy of weights changed since (a restore, a step) -- issue 20's g = -1.15 for -0.39
    return Parallel(world, "fsdp", shard(model, policy, reshard_after_forward=True))


@dataclass(frozen=True)
class RankShare:
    """This rank's share of each step's examples (a contiguous slice, as even as the batch allows), taken in
    `micro_batches` contiguous parts, each part's gradient weighted by its share of the whole batch's loss."""

    world: World
    micro_batches: int = 1  # train.grad_accumulation
    no_sync: Callable | None = None  # DDP's: no gradient all-reduce in the backward of all but the last part
    recording: Any = None  # the run's RecordingLoss: the step records the whole batch's loss, not the parts'

    def split(self, indices: list[int]) -> tuple[list[int], ...]:
        """This rank's micro-batches of a step's examples (one process: empty ones left out of a short batch;
        ranks run the same collectives in every part, so each needs a part of its own)."""
        n, size, parts = len(indices), self.world.size, self.micro_batches
        if self.world.distributed and n < size * parts:
            raise ZobenchError(f"a batch of {n} examples cannot be split over {size} ranks x {parts} micro-batches "
                               f"(train.grad_accumulation): make train.batch_size and the last batch of an epoch "
                               f"(data.n_train modulo it) at least {size * parts}")
        mine = self.world.share(indices)
        return tuple(part for part in (World(r, parts).share(mine) for r in range(parts)) if part)

    def accumulate(self, parts, backward: Callable[[Any, float], float]) -> float:
        """Runs `backward(part, weight)` (a forward and backward of the part's mean loss times `weight`, which
        returns that mean) over this rank's parts, each weighted by its loss terms (objective.loss_terms) over
        the whole batch's times the count of parts over all ranks: the weight is about 1 (exactly 1 for even
        parts), so a part's 16-bit gradient is the same whichever rank or process takes it (one process with
        grad_accumulation=2 as 2 ranks, bit for bit). The method divides the summed gradients by its count of
        parts and the ranks average theirs: the gradient of the whole batch's mean. Returns that mean, which
        every rank gets."""
        counts = [loss_terms(part) for part in parts]
        device = parts[0].input_ids.device  # NCCL reduces device tensors, gloo host ones
        total = self._sum(float(sum(counts)), device)
        everywhere = len(parts) * self.world.size  # under torchrun every rank takes micro_batches parts
        loss_sum = 0.0
        for i, (part, count) in enumerate(zip(parts, counts)):
            last = i == len(parts) - 1
            with self.no_sync() if self.no_sync is not None and not last else contextlib.nullcontext():
                loss_sum += backward(part, count * everywhere / total) * count
        value = self._sum(loss_sum, device) / total
        if self.recording is not None:  # the parts' values it recorded: this rank's micro-batch means
            self.recording.values[:] = [value]
        return value

    def _sum(self, value: float, device) -> float:
        """`value` summed over the ranks, in float64 (itself in one process)."""
        if not self.world.distributed:
            return value
        import torch.distributed as dist

        summed = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(summed)
        return float(summed)
