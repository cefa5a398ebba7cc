"""Zeroth-order `shard` mode (parallel.zo=shard): θ sharded with FSDP2, each rank perturbing and updating its shard.

Every rank runs the forward on the whole batch through FSDP2, which all-gathers one decoder layer at a time, so
the loss, and so g, is the same on every rank. Each rank then perturbs and updates only its own rows of each
parameter, with its slice of the engine's seeded blocks of z (`local_piece` says where the rows lie; engine.py
draws only the blocks over them): z and the step are one process's, bit for bit. Memory per rank: θ/N, plus,
during a forward, the root unit (embeddings, head) and one decoder layer gathered; compute: the whole batch on
every rank (the way to fit 66B/70B ZO, not to go faster). Sent per rank per step: the all-gathers of 2q forwards,
2q·(N−1)/N·|θ| bytes (measured: 55.17 MB = |θ| for N = 2, q = 1 on a 13.8M-parameter OPT in fp32).

Sparse MeZO perturbs inside each module's forward, where FSDP2 hands the module the gathered parameter: each
rank builds the whole perturbed copy of the running layer (as one process does), and its per-parameter
thresholds are quantiles of the whole parameters, gathered once (`whole`). Its update, like every method's,
touches the local rows only.

Addax runs here too: its ZO half as above, its first-order half as in_place.py says (a step on the sharded
gradients after backward).

No drift between replicas is possible: no element of θ exists twice, each shard is written by its rank alone.
(Modes that replicate θ and perturb it in place must keep the replicas equal; this one has none.)

The trap (issue #20): FSDP2 by default leaves the root unit's parameters (embeddings, final norm, head) gathered
after a forward, expecting a backward to reshard them. A ZO step has no backward: the next forward would reuse the
stale gathered copies of weights the step has since perturbed (g = −1.15 instead of −0.39 in the issue; 1.72
instead of 2.61 on opt-tiny in tests/test_distributed_shard.py). Which units FSDP2
reshards after a forward depends on its heuristics and their version (torch 2.13 honours an explicit
reshard_after_forward=True on the root too); `fresh_forwards` makes it independent of them: every unit is
resharded after each forward of the model, so each forward gathers θ as it now is.
"""

from __future__ import annotations

import math
import sys

import torch

from ..errors import ZobenchError
from .shard import shard

def shard_for_zo(model: torch.nn.Module) -> torch.nn.Module:
    """Shards `model` with FSDP2 (a unit per decoder layer, then the root) for zeroth-order steps: every
    forward sees θ as it is now (see the module's note on the trap). Shard before the method is built: FSDP2
    replaces the model's parameters, and an engine built earlier would perturb the replaced ones. Gradients (Addax's
    first-order half, in_place.py) are reduce-scattered in fp32, as one process's fp32 update arithmetic reads them."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return fresh_forwards(shard(model, MixedPrecisionPolicy(reduce_dtype=torch.float32), reshard_after_forward=True))


def fresh_forwards(model: torch.nn.Module) -> torch.nn.Module:
    """After each forward of the (FSDP2-sharded) `model`, every unit's gathered parameters are freed, the
    root's too: the next forward gathers the shards afresh, with whatever a ZO step wrote into them."""
    model.register_forward_hook(lambda module, args, output: reshard_all(module))
    return model


def reshard_all(model: torch.nn.Module) -> None:
    """Every FSDP2 unit of `model` back to its shards (their parameters the sharded ones again)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def whole(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter: a sharded one gathered (a collective: every rank calls it, in the same order)."""
    if not _is_dtensor(param):
        return param
    with torch.no_grad():
        return param.full_tensor()


def _is_dtensor(param: torch.Tensor) -> bool:
    tensor_module = sys.modules.get("torch.distributed.tensor")  # imported by whatever sharded the model
    return tensor_module is not None and isinstance(param, tensor_module.DTensor)


def local_piece(name: str, param: torch.Tensor) -> tuple[torch.Tensor, int, int] | None:
    """For a parameter sharded on dim 0 (FSDP2's Shard(0), rows split as torch.chunk splits them, the last
    ranks' possibly shorter or empty): (this rank's rows, contiguous, the index of their first element in the
    whole parameter flattened, the whole parameter's element count). None for an ordinary tensor."""
    if not _is_dtensor(param):
        return None
    with torch.no_grad():
        local = param.to_local()  # a view of this rank's rows: writing it writes the shard
    mesh, placements = param.device_mesh, param.placements
    if mesh.ndim == 1 and placements[0].is_replicate():
        return local, 0, param.numel()
    if mesh.ndim != 1 or not placements[0].is_shard(0) or param.dim() == 0:
        raise ZobenchError(f"parameter {name} is sharded as {placements} over a {mesh.ndim}-D mesh: "
                           f"parallel.zo=shard perturbs parameters sharded on dim 0 over one mesh dimension "
                           f"(zobench.parallel.shard)")
    rows, ranks, rank = param.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = -(-rows // ranks)
    first = min(rank * chunk, rows)
    if tuple(local.shape) != (min(chunk, rows - first), *param.shape[1:]):
        raise ZobenchError(f"parameter {name}: rank {rank} holds rows of shape {tuple(local.shape)}, not torch.chunk's "
                           f"split of {tuple(param.shape)} over {ranks} ranks; parallel.zo=shard needs it")
    return local, first * math.prod(param.shape[1:]), param.numel()
