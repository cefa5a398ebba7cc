"""The processes of one run, as torchrun describes them (RANK, WORLD_SIZE, LOCAL_RANK), and their process group.

A run started without torchrun is a world of one: nothing here starts a process group for it, so every
one-process code path stays exactly as it was. A task of a submitit job with several tasks (SLURM's, or the
local executor's: hydra/launcher=slurm_multigpu) is a rank too: `join_submitit_tasks` gives it torchrun's
variables from submitit's own TorchDistributedEnvironment, so from here on it runs as a torchrun rank does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from ..errors import ZobenchError

# How long a collective waits for a rank that went silent before it raises on the others (gloo and NCCL);
# torchrun's agent also ends the other ranks when one dies, so this only bounds a hang.
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 owns the run directory: it alone writes the run's files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, items: list) -> list:
        """This rank's contiguous slice of `items`, the ranks' sizes differing by at most one (empty where there
        are fewer items than ranks)."""
        n = len(items)
        return items[n * self.rank // self.size: n * (self.rank + 1) // self.size]


def from_env(environ=os.environ) -> World:
    """This process's place in the run, from torchrun's variables (a world of one without them)."""
    try:
        size = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError as error:
        raise ZobenchError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers (set by torchrun): {error}") from None
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise ZobenchError(f"RANK={rank} WORLD_SIZE={size} LOCAL_RANK={local_rank} is not a valid torchrun world")
    return World(rank, size, local_rank)


def join_submitit_tasks() -> World:
    """This process's place in the run when it is a task of a submitit job (submitit sets SUBMITIT_EXECUTOR):
    with several tasks and no torchrun variables, it exports submitit's TorchDistributedEnvironment (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR: the job's first node, MASTER_PORT: MASTER_PORT if set, else drawn
    from the job id, the same on every task and on every requeue) for torch.distributed's env:// rendezvous.
    Every GPU of the node stays visible: init_process_group takes the one at LOCAL_RANK, as under torchrun."""
    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR"):
        from submitit.helpers import TorchDistributedEnvironment

        tasks = TorchDistributedEnvironment()
        if tasks.world_size > 1:
            tasks.export(set_cuda_visible_devices=False, overwrite=True)
    return from_env()


def init_process_group(world: World, device_type: str) -> None:
    """Joins the run's process group: NCCL between GPUs, gloo on CPU. A world of one joins none."""
    import torch
    import torch.distributed as dist

    if not world.distributed or dist.is_initialized():
        return
    if device_type == "cuda":
        # a task that SLURM gave one GPU of the node (--gpus-per-task, --gpu-bind) sees it as cuda:0
        torch.cuda.set_device(world.local_rank if torch.cuda.device_count() > 1 else 0)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
