"""keep_best=disk over FSDP2 shards, step by step, for tests/test_distributed_best.py:
`torchrun --nproc_per_node=2 tests/distributed_best_worker.py OUT`. Every rank builds opt-tiny with zobench's
build functions, shards it (parallel.fo=fsdp, Adam) and keeps its best-on-dev weights on disk
(best_weights.BestWeights): rank 0 owns OUT/run, the other ranks scratch folders, as under `torchrun -m zobench`.

  live      save, change the weights, restore: the saved weights come back bit for bit
  resumed   save; a new BestWeights (a resumed run's) over each rank's copy of rank 0's folder adopts the
            recorded files (the checkpoint's record of them) and restores them bit for bit
  edited    a byte of rank 1's file changed: the resume (adopt_saved) and the live restore are refused on
            every rank

Writes OUT/result.rank<r>.json: what each case gave on that rank (rank 0 also the files it wrote).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from distributed_fo_worker import QUICK
from zobench.best_weights import FILE, BestWeights
from zobench.build import build_model
from zobench.configs import compose
from zobench.errors import ZobenchError
from zobench.models import trained_parameters
from zobench.parallel import world as worlds
from zobench.parallel.first_order import parallelize
from zobench.parallel.sharded_checkpoint import full_weights, local, rank_file
from zobench.parallel.transport import broadcast_bytes
from zobench.run_dir import RunDir, safetensors_metadata
from zobench.spec import RunSpec


def main(out: Path) -> None:
    spec = RunSpec.from_cfg(compose(QUICK))
    torch.manual_seed(spec.seed)
    world = worlds.from_env()
    worlds.init_process_group(world, "cpu")
    model, _, _ = build_model(spec, max_length=spec.max_length)
    parallelize(model, spec.method.cls, world, spec.parallel, spec.precision)
    lead = out / "run"
    directory = own_folder(lead, world)
    best = BestWeights(model, "disk", directory, world=world)
    result = {}

    saved = kept(best, model, 1)  # live: save, change, restore
    result["files"] = {p.name: safetensors_metadata(p) for p in lead.glob("best_weights*")} if world.main else None
    torch.distributed.barrier()
    nudge(model)
    best.restore()
    result["live"] = same(full_weights(model), saved)
    result["left"] = sorted(p.name for p in lead.glob("best_weights*"))  # the test has them: deleted

    saved, record = kept(best, model, 2), shared(best.record())  # resumed: a copy of rank 0's folder
    resumed = BestWeights(model, "disk", follow(lead, world, directory), world=world)
    result["adopted"] = resumed.adopt_saved(2, record)
    nudge(model)
    resumed.restore()
    result["resumed"] = same(full_weights(model), saved)
    result["record"] = record

    kept(best, model, 3)  # edited: rank 1's file changed after the save
    record = shared(best.record())
    if world.main:
        edit(lead / rank_file(FILE, 1))
    torch.distributed.barrier()
    resumed = BestWeights(model, "disk", follow(lead, world, directory), world=world)
    result["resume_refused"] = refusal(lambda: resumed.adopt_saved(3, record))
    result["restore_refused"] = refusal(best.restore)
    (out / f"result.rank{world.rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def own_folder(lead: Path, world) -> RunDir:
    """Rank 0: the run folder; another rank: its scratch folder (a run directory of its own)."""
    folder = lead if world.main else Path(tempfile.mkdtemp()) / "scratch"
    directory = RunDir(folder).claim()
    directory.start("{}\n", [])
    torch.distributed.barrier()
    return directory


def follow(lead: Path, world, directory: RunDir) -> RunDir:
    """The folder a resumed rank reads: rank 0's own; another rank's copy of it (zobench/parallel/launch.py)."""
    if world.main:
        return directory
    copy = Path(tempfile.mkdtemp()) / "run"
    shutil.copytree(lead, copy, ignore=shutil.ignore_patterns("*.lock", ".lock*"))
    return RunDir(copy).claim()


def kept(best: BestWeights, model, step: int) -> dict[str, torch.Tensor]:
    """Changes the weights and saves them as step `step`'s best; returns them whole."""
    nudge(model)
    saved = full_weights(model)
    best.save(step)
    return saved


@torch.no_grad()
def nudge(model) -> None:
    for param in trained_parameters(model).values():
        local(param).add_(torch.randn_like(local(param)))


def same(now: dict, saved: dict) -> bool:
    return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in now)


def shared(record: dict | None) -> dict:
    """Rank 0's record of the best (what every rank reads from its copy of the checkpoint on a resume)."""
    return json.loads(broadcast_bytes(json.dumps(record).encode() if torch.distributed.get_rank() == 0 else None))


def edit(path: Path) -> None:
    """One byte of the tensors' data changed (the header intact: the file is still read as safetensors)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def refusal(call) -> str | None:
    try:
        call()
    except ZobenchError as error:
        return str(error)
    return None


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
