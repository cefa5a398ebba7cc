"""First-order methods over more than one process (torchrun): FSDP2 or DDP around the model, each rank its
share of every batch, so that N ranks take the one-process step on the whole batch.

- `parallelize` wraps the model once it is built, before the method is: `parallel.fo=fsdp` shards it with
  FSDP2 (shard.py: a unit per decoder layer + the root, MeZO's `--fsdp "full_shard auto_wrap"`), `ddp`
  replicates it (DistributedDataParallel, where the model fits one device). The HF `--fp16` regime
  (precision.master_weights on 16-bit weights) keeps fp32 master weights sharded and computes in 16-bit under
  the optimizer's autocast, from fp32 gathers (the one-process arithmetic) or, `parallel.fsdp_param_dtype=
  weights`, fp16 ones (MixedPrecisionPolicy(param_dtype=fp16, reduce_dtype=fp32)).
- `RankShare` splits each step's examples over the ranks and weighs each rank's mean loss by its share of the
  terms averaged (examples; an lm task's option tokens), so the averaged gradients are the gradient of the
  whole batch's mean (a short last batch included).
- The loss scaler's overflow and the clipping norm need no flag of their own: clip_grad_norm_ over DTensor
  gradients reduces the norm over all shards, so an inf in any shard is an inf norm on every rank (DDP's
  gradients are all-reduced before it), and every rank skips the same step.
Only torch optimizers (Adam, SGD, AdamW, head-tuning) run here: IP-SGD updates each parameter inside backward,
before FSDP has reduced its gradient, so it is refused under torchrun. (Addax runs in a parallel.zo mode, its
first-order half as in_place.py says.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ZobenchError
from ..models import trained_parameters
from ..objective import loss_terms
from ..optim.base import FIRST_ORDER
from .world import World


@dataclass(frozen=True)
class Parallel:
    """How the run's model is spread over the ranks: `forward` is the module whose call runs the whole model
    (FSDP2's root, whose hooks gather the shards, or DDP's wrapper), None in a one-process run."""

    world: World
    mode: str = "none"  # "none" | "fsdp" | "ddp"
    forward: torch.nn.Module | None = None

    def attach(self, method) -> None:
        """The method takes its rank's share of each batch (a one-process run: the whole batch)."""
        if self.mode != "none":
            method.share = RankShare(self.world)


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
        _to_fp32(model)  # the master weights are what FSDP shards (and DDP replicates): fp32 before wrapping
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


@torch.no_grad()
def _to_fp32(model: torch.nn.Module) -> None:
    """As first_order._to_fp32 does in one process: the trained parameters become fp32 (same Parameters)."""
    for param in trained_parameters(model).values():
        if param.dtype != torch.float32:
            param.data = param.data.float()


@dataclass(frozen=True)
class RankShare:
    """This rank's share of each step's examples: a contiguous slice, as even as the batch allows."""

    world: World

    def split(self, indices: list[int]) -> list[int]:
        n, size = len(indices), self.world.size
        if n < size:
            raise ZobenchError(f"a batch of {n} examples cannot be split over {size} ranks: make train.batch_size "
                               f"and the last batch of an epoch (data.n_train modulo it) at least {size}")
        return self.world.share(indices)

    def weigh(self, loss: torch.Tensor, batch) -> tuple[torch.Tensor, float]:
        """(the loss to differentiate, the whole batch's mean loss): this rank's mean loss over `batch` weighted
        by its share of the terms averaged (objective.py: examples; for an lm loss, option tokens) times the world
        size, so the ranks' averaged gradients are the gradient of the whole batch's mean."""
        import torch.distributed as dist

        count = loss_terms(batch)

        sums = torch.tensor([float(count), float(loss.detach()) * count], dtype=torch.float64,
                            device=loss.device)  # NCCL reduces device tensors, gloo host ones
        dist.all_reduce(sums)
        total, loss_sum = sums.tolist()
        return loss * (count * self.world.size / total), loss_sum / total
