"""Addax's first-order half over the ranks of a torchrun job; its zeroth-order half runs as zo.py and zo_shard.py say.

In one process the FO half (optim/ip_sgd.py InPlaceSGDStep) applies each parameter's gradient inside backward.
Over N ranks, in every parallel.zo mode, each rank takes its slice of the step's short examples B1 (World.share),
and differentiates zo.DataParallelLoss: its value is the whole B1's mean loss (recorded in the trajectory as one
process records it), its gradient this rank's part of the whole B1's mean gradient.

- data and directions (θ whole on every rank): inside the hook, before a gradient is measured or applied, it is
  summed over the ranks (`ReducedGradients`, counted in bytes_sent_per_step_per_rank). Every rank then applies
  the whole B1's gradient with InPlaceSGDStep's arithmetic, the same bits on every rank: the replicas stay
  bit-identical, and the norm pass's norm and an fp16 overflow are the global ones (all ranks skip the same
  step). 16-bit gradients are summed in fp32, a chunk at a time, and rounded once into their dtype. Sent per
  rank per step: θ's gradient in fp32 (|θ|·4 bytes) once per backward, twice with loss scaling or clipping
  (LOMO's norm pass), besides the loss scalars. The ranks' hooks fire in the same order (the same model, the
  same graph), so each all-reduce pairs the same parameter on every rank; were they ever not to, the replicas
  would part, and metrics.json's replicas_identical would say so.
  directions mode splits B1 as data mode does rather than running the whole B1 on every rank with no exchange:
  the FO work is shared out, and the summed gradient keeps the replicas bit-identical by construction, which N
  separate backwards would not on a GPU whose backward is not deterministic (the embedding's scatter-add).
- shard (θ sharded by FSDP2): a hook on a parameter sees the unsharded gradient of this rank's slice, before
  FSDP2 reduces it. So the FO half runs one backward through FSDP2, which reduce-scatters each layer's gradients
  (in fp32) into the shards, and `ShardedSGDStep` then updates each rank's rows with InPlaceSGDStep's per-element
  arithmetic (`apply`), the norm summed over all shards and the same loss scaling, and frees the gradients. It
  needs no norm pass: the gradients are held. Memory: the sharded gradients, |θ|/N in θ's dtype, held until the
  step ends, where one process's in-place step holds one parameter's gradient at a time (and FSDP2 holds one
  layer's unsharded gradients during backward).
"""

from __future__ import annotations

import math

import torch

from ..errors import ZobenchError
from ..optim.engine import decays
from ..optim.ip_sgd import InPlaceSGDStep, chunks, sum_on_one_device
from .world import World
from .zo import DataParallelLoss, Exchange
from .zo_shard import local_piece, reshard_all


def check_split(settings, mode: str, world: World) -> None:
    """Refuses, in one line before anything loads, an Addax step whose examples cannot be split over the ranks:
    B1 is split in every mode, B0 in data mode (`settings`: Addax.Settings)."""
    if settings.k1 < world.size:
        raise ZobenchError(f"parallel.zo={mode} splits Addax's optimizer.k1={settings.k1} short (first-order) "
                           f"examples over {world.size} ranks: set optimizer.k1 to at least {world.size}")
    if mode == "data" and settings.k0 < world.size:
        raise ZobenchError(f"parallel.zo=data splits Addax's optimizer.k0={settings.k0} long (zeroth-order) "
                           f"examples over {world.size} ranks: set optimizer.k0 to at least {world.size} "
                           f"(or use parallel.zo=directions)")


def attach(plan, method, exchange: Exchange, objective, recording) -> None:
    """Addax under torchrun (`plan`: zo.ZOParallel): its FO half's loss is the whole B1's from this rank's slice,
    and its gradients are summed over the ranks (data, directions) or reduce-scattered by FSDP2 (shard)."""
    from ..optim.addax import Addax

    if not (plan.world.distributed and isinstance(method, Addax)):
        return
    sharded = plan.shards_weights
    # FSDP2 averages the ranks' gradients, the hook below sums them
    whole_b1 = DataParallelLoss(objective, exchange, gradient_factor=plan.world.size if sharded else 1.0)
    method.fo_loss_fn = _RecordedIn(recording, whole_b1)
    if sharded:
        method.fo = ShardedSGDStep(method.model, method.precision, exchange)
        _gather_buffers_outside_inference_mode(method.model)
    else:
        method.fo.reduce_gradient = ReducedGradients(exchange)


class _RecordedIn:
    """A loss closure whose values go into the run's RecordingLoss, after the ZO half's, as one process's."""

    def __init__(self, recording, loss_fn):
        self.recording, self.loss_fn = recording, loss_fn

    def __call__(self, batch) -> torch.Tensor:
        loss = self.loss_fn(batch)
        self.recording.values.append(float(loss.detach()))
        return loss


class ReducedGradients:
    """A gradient summed over the ranks, in place: every rank gets the same bits (data and directions modes)."""

    def __init__(self, exchange: Exchange):
        self.exchange = exchange

    @torch.no_grad()
    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        if grad.element_size() >= 4:
            return self.exchange.all_reduce_sum(grad)
        for part in chunks(grad):  # 16-bit: summed in fp32, a chunk at a time, rounded once
            total = self.exchange.all_reduce_sum(part.float())
            part.copy_(total)
        return grad


class ShardedSGDStep(InPlaceSGDStep):
    """shard mode's FO half: one backward through FSDP2 (the gradients reduce-scattered into the shards), then
    InPlaceSGDStep's update on each rank's rows, the norm over all shards; see the module's note."""

    def __init__(self, model, precision, exchange: Exchange):
        super().__init__(model, precision)
        self.exchange = exchange

    # InPlaceSGDStep.__call__ takes the step's decisions (loss scale, overflow skip, clipping coefficient); only
    # its two passes differ here: one backward through FSDP2, then the update of each rank's rows

    def _norm_pass(self, named, scaled: torch.Tensor, scale: float) -> float:
        scaled.backward()  # the one backward: FSDP2 reduce-scatters the gradients into the shards, held
        norm = self._sharded_norm(named) / scale
        if not math.isfinite(norm):  # the step is skipped (or the run diverged): no gradient is kept
            _free_gradients(named)
        return norm

    def _update_pass(self, named, scaled: torch.Tensor, lr: float, weight_decay: float, factor: float) -> None:
        try:
            if all(param.grad is None for _, param in named):  # no norm was needed: the backward is this one
                scaled.backward()
            with torch.no_grad():
                for name, param in named:
                    if param.grad is not None:
                        self.apply(_rows(name, param), _rows(name, param.grad), lr,
                                   weight_decay if decays(name) else 0.0, factor)
        finally:
            _free_gradients(named)  # the sharded gradients go as soon as the step is taken

    @torch.no_grad()
    def _sharded_norm(self, named) -> float:
        """The (scaled) gradient's norm over all shards: each rank's sum of squares, summed over the ranks."""
        squares = [torch.linalg.vector_norm(part, dtype=torch.float32).square()
                   for name, param in named if param.grad is not None for part in chunks(_rows(name, param.grad))]
        local = sum_on_one_device(squares) if squares else torch.zeros((), dtype=torch.float32)
        total = self.exchange.all_reduce_sum(local.reshape(1).to(self.exchange.device))
        return math.sqrt(float(total))


@torch.no_grad()
def _gather_buffers_outside_inference_mode(model: torch.nn.Module) -> None:
    """FSDP2 allocates the buffers a unit gathers its parameters into at its first unshard and keeps them; made
    during a ZO forward (inference mode) they would be inference tensors, which the FO half's forward (autograd on)
    may not write ("Inplace update to inference tensor outside InferenceMode"). So they are made here, first."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()
    reshard_all(model)


def _free_gradients(named) -> None:
    for _, param in named:
        param.grad = None


def _rows(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a sharded parameter or gradient (a view: writing it writes the shard)."""
    piece = local_piece(name, tensor)
    return tensor if piece is None else piece[0]
