"""Runs `zobench ARGS` in this process, counting the bytes of the tensors each rank passes to torch.distributed's
collectives (benchmarks/distributed.py runs it under torchrun, one per rank):

    torchrun --standalone --nproc_per_node=2 benchmarks/_count_collectives.py COUNTS_DIR ARGS...

zobench's code is unchanged: before it is imported, this wraps
- torch.distributed's collectives (all_reduce, all_gather, all_gather_into_tensor, all_gather_single,
  reduce_scatter*, broadcast, reduce, all_to_all_single): each counts the tensor this rank passes in (its
  contribution: a reduce-scatter's whole input, an all-gather's own shard), whatever the backend then sends;
- DistributedDataParallel: its gradient all-reduce runs in C++ (the Reducer), out of Python's sight, so each
  DDP gets torch's own `allreduce_hook` as its comm hook, the same averaging all-reduce made through Python's
  dist.all_reduce (so counted);
- zobench's Optimizer.step: bytes are counted inside training steps apart from the rest (setup, evaluation,
  the run summary), so the per-step figure is the steps' alone.
At exit each rank writes COUNTS_DIR/rank<R>.json: {"steps", "bytes_in_steps", "bytes_total", "calls"}.
"""

from __future__ import annotations

import functools
import json
import os
import runpy
import sys
import threading

# collective name -> (position, keyword) of the tensor (or list of tensors) this rank contributes
SENT = {"all_reduce": (0, "tensor"), "broadcast": (0, "tensor"), "reduce": (0, "tensor"),
        "all_gather": (1, "tensor"), "all_gather_into_tensor": (1, "input_tensor"),
        "all_gather_single": (1, "input_tensor"), "reduce_scatter_tensor": (1, "input"),
        "reduce_scatter_single": (1, "input"), "reduce_scatter": (1, "input_list"),
        "all_to_all_single": (1, "input")}


class Counts:
    def __init__(self):
        self.steps = self.bytes_in_steps = self.bytes_total = 0
        self.calls: dict[str, int] = {}
        self.in_step = False
        self.depth = threading.local()  # a collective made inside another (a wrapper's own) is counted once

    def add(self, name: str, sent) -> None:
        tensors = sent if isinstance(sent, (list, tuple)) else [sent]
        size = sum(t.numel() * t.element_size() for t in tensors)
        self.bytes_total += size
        if self.in_step:
            self.bytes_in_steps += size
            self.calls[name] = self.calls.get(name, 0) + 1

    def as_dict(self) -> dict:
        return {"steps": self.steps, "bytes_in_steps": self.bytes_in_steps, "bytes_total": self.bytes_total,
                "calls": self.calls}


def _counting(counts: Counts, name: str, original):
    position, keyword = SENT[name]

    @functools.wraps(original)
    def collective(*args, **kwargs):
        outer = not getattr(counts.depth, "level", 0)
        if outer:
            counts.add(name, args[position] if len(args) > position else kwargs[keyword])
        counts.depth.level = getattr(counts.depth, "level", 0) + 1
        try:
            return original(*args, **kwargs)
        finally:
            counts.depth.level -= 1

    return collective


def install(counts: Counts) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    from zobench.optim.base import Optimizer

    for name in SENT:
        if hasattr(dist, name):
            setattr(dist, name, _counting(counts, name, getattr(dist, name)))

    ddp_init = DistributedDataParallel.__init__

    def init(self, *args, **kwargs):
        ddp_init(self, *args, **kwargs)
        self.register_comm_hook(None, allreduce_hook)  # None: the default group, as DDP's own all-reduce

    DistributedDataParallel.__init__ = init

    step = Optimizer.step

    def counted_step(self, batch):
        counts.in_step = True
        try:
            return step(self, batch)
        finally:
            counts.in_step = False
            counts.steps += 1

    Optimizer.step = counted_step


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    counts = Counts()
    install(counts)
    sys.argv = ["zobench", *args]
    try:
        runpy.run_module("zobench", run_name="__main__", alter_sys=True)
    finally:
        rank = os.environ.get("RANK", "0")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:  # our own scratch folder, not a run folder
            json.dump(counts.as_dict(), f)


if __name__ == "__main__":
    main()
