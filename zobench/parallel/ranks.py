"""What a run does differently over the ranks of a torchrun job, behind one object the runner calls.

The runner's recipe stays the one-process one; at each point where ranks matter it asks its `Ranks`:
where the model is placed (zo_shard.py shards θ for parallel.zo=shard; first_order.py wraps a first-order
method's model in FSDP2 or DDP), which loss the method trains on (zo.py: data mode's all-reduced loss),
how the method's directions are spread (directions mode), how Addax's first-order half exchanges its gradients
(in_place.py), which examples of a step are this rank's, and what metrics.json says of the ranks at the end.
A world of one gets the one-process run, unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..models import input_device, model_source
from . import in_place, sharded_load
from .first_order import Parallel, check_batch, parallelize
from .world import World
from .zo import FIRST_ORDER_MODES, Exchange, ZOParallel, from_spec, spread_directions, summary, training_loss
from .zo_shard import shard_for_zo

log = logging.getLogger(__name__)


class Ranks:
    def __init__(self, spec, world: World):
        """Checks what runs over the ranks (one line per refusal) before any data or model is read."""
        self.spec, self.world = spec, world
        self.plan: ZOParallel = from_spec(spec, world)
        self.streams = sharded_load.streams(spec, self.plan)  # each rank loads its shard only
        if self.streams:
            sharded_load.check(spec)
        if self.plan.mode in FIRST_ORDER_MODES:  # a first-order method over the ranks
            check_batch(spec.train, world)
        self.first_order: Parallel | None = None
        self.exchange: Exchange | None = None
        self.objective = None  # the run's Objective (training_loss)

    def input_device(self, model: torch.nn.Module) -> torch.device:
        """Where batches go: the device of the (first shard of the) model, or, for a skeleton to be filled
        (`streams`), the device this rank's shards are allocated on."""
        if self.streams:
            device = self.spec.device
            return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device
        return input_device(model)

    def place(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module | None:
        """Shards or wraps the built model before the objective and the method are built (FSDP2 replaces the
        parameters); returns the module whose call runs the whole model (None: the objective's own split)."""
        self.exchange = Exchange(self.world, device)  # the collectives of the job, the bytes sent counted
        if self.plan.shards_weights:
            shard_for_zo(model)
        wrapped = self.plan.mode in FIRST_ORDER_MODES  # FSDP2/DDP; Addax runs in a ZO mode (its FO half: in_place.py)
        self.first_order = parallelize(model, self.spec.method.cls, self.world, self.spec.parallel,
                                       self.spec.precision) if wrapped else Parallel(self.world)
        if self.streams:  # the skeleton sharded as a loaded model is: now this rank's rows
            folder = sharded_load.folder_of(model_source(dict(self.spec.model)))
            read = sharded_load.fill(model, folder, self.spec.dtype, device)
            log.info("rank %d read its shards of the weights from %s: %d bytes", self.world.rank, folder, read)
        return self.first_order.forward or (model if self.plan.shards_weights else None)

    def training_loss(self, objective):
        """The loss the method trains on: data mode's whole-batch loss from every rank's share."""
        self.objective = objective
        return training_loss(self.plan, objective, self.exchange)

    def attach(self, method, recording) -> None:
        """A first-order method takes its rank's share of each batch (in train.grad_accumulation micro-batches);
        directions mode spreads the q directions; Addax's first-order half takes its share of B1 and exchanges its
        gradients."""
        self.first_order.attach(method, self.spec.train.grad_accumulation, recording)
        spread_directions(self.plan, method, self.exchange, recording)
        in_place.attach(self.plan, method, self.exchange, self.objective, recording)

    def local(self, indices):
        """This rank's examples of a step (data mode: a slice; otherwise all of them; Addax's B1 a slice in every
        mode)."""
        return self.plan.local(indices)

    def stop_agreed(self, requested: bool) -> bool:
        """Whether the run stops after this step: where any rank was asked to (a signal reaches the ranks up to a
        step apart), every rank, so that they checkpoint the same step and none waits in the next step's
        collectives. A 4-byte all-reduce per step (not in bytes_sent_per_step_per_rank: not the method's)."""
        if not self.world.distributed:
            return requested
        import torch.distributed as dist

        flag = torch.tensor([int(requested)], dtype=torch.int32, device=self.exchange.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def summary(self, model, record) -> dict[str, Any]:
        """metrics.json's fields of a multi-rank run (a collective: every rank calls it at the same point)."""
        metrics = record.metrics
        steps_here = metrics["steps"] - (metrics["resumed_at_step"] or 0)
        from ..run_record import peak_memory

        fields = summary(self.plan, self.exchange, model, steps_here, peak_memory(record.device)[0], metrics["tokens"])
        if fields.get("replicas_identical") is False:
            log.warning("the ranks' weights differ (replica drift): %s", fields)
        return fields
