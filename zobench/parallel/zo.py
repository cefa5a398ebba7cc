"""Zeroth-order methods over the ranks of a torchrun job: the ranks agree on the seeds and exchange scalars.

- `data` (parallel.zo=data): each rank takes a slice of each step's batch; all ranks draw the same z. Each
  ±eps·z loss is the one-process loss on the whole batch: the ranks all-reduce its numerator and denominator
  (Objective.loss_parts: per-example CE summed / examples, or token NLL summed / tokens). Every rank then
  perturbs and updates its replica with the same z and the same scalars, op for op, so the replicas stay
  bit-identical (the ops that write θ see identical inputs; only the forwards see different data).
- `directions` (parallel.zo=directions): the step's q seeds are drawn on every rank; each rank evaluates its
  share of them on the whole batch, and the (loss+, loss−) pairs are all-gathered; every rank then applies
  the one-process q-direction update. Every rank makes all q perturbations in the same order (a forward only
  for its own), so θ takes the same values, roundings included, on every rank and in one process.
Dev/test evaluation needs no exchange: every rank evaluates the whole split itself, so every rank takes the
same early-stopping and best-on-dev decisions (rank 0 alone records them).
The trajectory keeps the global losses per step in the one-process order, so `zobench-replay` on one process
rebuilds a multi-rank run's weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..errors import ZobenchError
from .world import World

FIRST_ORDER_MODES = ("fsdp", "ddp")  # parallel.fo: a first-order method's plan (first_order.py), not this module's
SHARDED = ("shard", "fsdp")  # each rank holds a part of θ: no replica to compare, and FSDP2's gathers are not counted


@dataclass(frozen=True)
class ZOParallel:
    """The run's parallel mode over its world (`from_spec`): parallel.zo's, or a first-order method's
    parallel.fo (whose batch split is first_order.RankShare's)."""
    mode: str
    world: World
    paired: bool = False  # Addax: each step's examples are a pair (B0, B1)

    @property
    def label(self) -> str:
        return f"{'fo' if self.mode in FIRST_ORDER_MODES else 'zo'}={self.mode}"

    @property
    def shards_weights(self) -> bool:
        """parallel.zo=shard over more than one rank (zo_shard.py); one process runs as it always does."""
        return self.mode == "shard" and self.world.distributed

    @property
    def splits_batch(self) -> bool:
        return self.mode == "data" and self.world.distributed

    def local(self, indices):
        """This rank's examples of a step (data mode: a contiguous slice, sizes differing by at most one). Addax's
        pair (B0, B1): B0 as any ZO batch, B1 sliced in every mode (in_place.py)."""
        if not self.world.distributed or self.mode in FIRST_ORDER_MODES:
            return indices  # one process; or a first-order method's micro-batches, already its rank's (RankShare)
        if self.paired:
            zeroth, first = indices
            return self.local_zo(zeroth), self.world.share(first)
        return self.local_zo(indices)

    def local_zo(self, indices: list[int]) -> list[int]:
        return self.world.share(indices) if self.splits_batch else indices


def from_spec(spec, world: World) -> ZOParallel:
    """The run's parallel plan (`spec`: zobench/spec.RunSpec), checked with what the method can do in it before
    anything is loaded; one line per refusal. A first-order method runs as parallel.fo says (first_order.py)."""
    from ..optim.addax import Addax, zo_half
    from ..optim.base import EVALUATION_ONLY, FIRST_ORDER
    from ..optim.mezo import MeZO

    method, q_key, paired = spec.method, "optimizer.q", False
    mode, kind = spec.parallel.zo, method.cls.kind
    if not world.distributed or kind == EVALUATION_ONLY:
        return ZOParallel(mode, world)  # one process, or nothing trained: every rank evaluates the same
    if issubclass(method.cls, Addax):  # its FO half as in_place.py says; its ZO half as the ZO methods below
        from .in_place import check_split

        check_split(method.settings, mode, world)
        method, q_key, paired = zo_half(method.settings), "optimizer.zo_options.q", True
    elif kind == FIRST_ORDER:
        from .first_order import check_method

        check_method(method.cls, spec.parallel.fo)
        return ZOParallel(spec.parallel.fo, world)
    if mode == "shard":
        return ZOParallel(mode, world, paired)
    if not issubclass(method.cls, MeZO):
        raise ZobenchError(f"optimizer={method.name} does not run under torchrun; use one process")
    q = method.settings.q
    if mode == "directions" and q % world.size:
        raise ZobenchError(f"parallel.zo=directions spreads {q_key}={q} directions over {world.size} ranks: "
                           f"set {q_key} to a multiple of {world.size} (or use parallel.zo=data)")
    return ZOParallel(mode, world, paired)


class Exchange:
    """The collectives of one run, counting the bytes of the tensors this rank passes to them."""

    def __init__(self, world: World, device: torch.device):
        self.world, self.device = world, device  # the device of the tensors sent (NCCL: the rank's GPU)
        self.bytes_sent = 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        self.bytes_sent += tensor.numel() * tensor.element_size()
        dist.all_reduce(tensor)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[size, *tensor.shape]: every rank's tensor, in rank order."""
        import torch.distributed as dist

        self.bytes_sent += tensor.numel() * tensor.element_size()
        parts = [torch.empty_like(tensor) for _ in range(self.world.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)


class DataParallelLoss:
    """data mode's loss closure: the one-process loss on the whole batch, from this rank's slice of it.

    `batch` None: this rank's slice is empty (the last, short batch of an epoch): it adds nothing.
    Differentiated (Addax's first-order half, parallel/in_place.py), its gradient on each rank is this rank's part
    of the whole batch's: d(numerator_r)/denominator, times `gradient_factor`, so that the ranks' gradients summed
    (factor 1) or averaged (FSDP2's reduce-scatter: factor N) are the gradient of the whole batch's mean."""

    def __init__(self, objective, exchange: Exchange, gradient_factor: float = 1.0):
        self.objective, self.exchange, self.gradient_factor = objective, exchange, gradient_factor

    def __call__(self, batch) -> torch.Tensor:
        numerator = None
        if batch is None:
            parts = torch.zeros(2, dtype=torch.float64, device=self.exchange.device)
        else:
            numerator, denominator = self.objective.loss_parts(batch)
            parts = torch.stack([numerator.detach().double(), denominator.double()]).to(self.exchange.device)
        total = self.exchange.all_reduce_sum(parts)
        mean = (total[0] / total[1].clamp(min=1)).float()
        if numerator is None or not numerator.requires_grad:  # a ZO forward (inference mode)
            return mean
        share = _ShareOfTheMean.apply(numerator, mean.to(numerator.device),
                                      self.gradient_factor / float(total[1]))
        return self.objective.counting_backward(share)


class _ShareOfTheMean(torch.autograd.Function):
    """Forward: the whole batch's mean loss (all-reduced); backward: the gradient of this rank's numerator, times
    `scale` (gradient_factor / the whole batch's denominator)."""

    @staticmethod
    def forward(ctx, numerator: torch.Tensor, mean: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return mean.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.double() * ctx.scale, None, None


class SpreadDirections:
    """directions mode's estimate for a MeZO-family method (MeZO.projected_gradients hands it the step): the q
    seeds drawn on every rank, rank r evaluates directions r·q/N … (r+1)·q/N − 1 on the whole batch, and the
    [loss+, loss−] values are all-gathered in direction order.

    Every rank makes every direction's perturbations (MeZO: in place, in order; Sparse MeZO: none, it perturbs
    in the forward), evaluated or not, so θ goes through the same values on every rank and as in one process:
    the replicas never drift and the step is the one-process step bit for bit, at the price of the perturbation
    passes of the other ranks' directions (no forward). `recording` is the run's RecordingLoss: the gathered
    values are recorded in one-process order. When the method's loss_fn is another (a resume's replay of
    recorded values), all q directions take their values from it, as in one process, and nothing is sent.
    """

    def __init__(self, exchange: Exchange, recording):
        self.exchange, self.recording = exchange, recording

    def projected_gradients(self, method, batch) -> tuple[list[tuple[int, float]], float]:
        if method.loss_fn is not self.recording:  # replaying recorded values: one process's arithmetic
            return method.pairs_from(*method.direction_losses(batch, range(method.q)))
        world = self.exchange.world
        share = method.q // world.size
        mine = range(world.rank * share, (world.rank + 1) * share)
        method.loss_fn = self.recording.loss_fn  # evaluated here; recorded below, once gathered in order
        try:
            seeds, values = method.direction_losses(batch, mine)
        finally:
            method.loss_fn = self.recording
        own = torch.tensor(values[2 * mine.start: 2 * mine.stop], dtype=torch.float64, device=self.exchange.device)
        gathered = self.exchange.all_gather(own).reshape(-1).tolist()
        self.recording.values.extend(gathered)
        return method.pairs_from(seeds, gathered)


def training_loss(plan: ZOParallel, objective, exchange: Exchange):
    """The loss closure a run trains on: data mode's all-reduced whole-batch loss, else the objective itself."""
    return DataParallelLoss(objective, exchange) if plan.splits_batch else objective


def spread_directions(plan: ZOParallel, method, exchange: Exchange, recording) -> None:
    """directions mode under torchrun: the method's q directions (Addax: its ZO half's) go through SpreadDirections."""
    from ..optim.addax import Addax
    from ..optim.mezo import MeZO

    zeroth_order = method.zo if isinstance(method, Addax) else method
    if plan.mode == "directions" and plan.world.distributed and isinstance(zeroth_order, MeZO):
        zeroth_order.directions = SpreadDirections(exchange, recording)


def weights_digest(model) -> str:
    """SHA-256 of the trained parameters' bytes, in order: equal digests mean bit-identical replicas."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def summary(plan: ZOParallel, exchange: Exchange, model, steps: int, peak_bytes: int, tokens: int) -> dict:
    """metrics.json's fields for a multi-rank run, gathered from every rank (a collective: all ranks call it
    at the same point): the mode, per-rank peak memory, bytes sent per step and training tokens (metrics.json's
    `tokens` is rank 0's), and whether the replicas' weights are bit-identical."""
    world = plan.world
    if not world.distributed:
        return {}
    sharded = plan.mode in SHARDED
    digest = bytes(32) if sharded else bytes.fromhex(weights_digest(model))
    own = torch.tensor([peak_bytes, exchange.bytes_sent, tokens] + list(digest), dtype=torch.int64,
                       device=exchange.device)
    exchange_bytes = exchange.bytes_sent
    rows = exchange.all_gather(own).cpu().tolist()
    exchange.bytes_sent = exchange_bytes  # the summary's own exchange is not the steps'
    peaks = [row[0] for row in rows]
    return {
        "world_size": world.size, "parallel": plan.label,
        "peak_memory_bytes_per_rank": peaks, "peak_memory_bytes_max": max(peaks),
        "peak_memory_bytes_sum": sum(peaks),
        # the scalars of data/directions, counted; FSDP2's and DDP's own collectives are not (benchmarks/)
        "bytes_sent_per_step_per_rank": None if plan.mode in SHARDED + FIRST_ORDER_MODES else
        [row[1] / steps if steps else 0.0 for row in rows],
        "tokens_per_rank": [row[2] for row in rows],
        "replicas_identical": None if sharded else all(row[3:] == rows[0][3:] for row in rows),
    }
