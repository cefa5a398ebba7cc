"""One run over the ranks of a torchrun job: the process group, and rank 0's run folder.

Every rank runs the same recipe (the same steps, evaluations and decisions, zobench/parallel/zo.py), and a
rank writes only into its own run folder: rank 0's is the user's, each other rank's a private scratch
folder (Hydra's .hydra/ and zobench.log, the lock, records, checkpoints), deleted when the rank exits. So
nothing of another rank ever reaches the run folder, and no writer needs to know about ranks.
Rank 0 decides the folder: Hydra's default name holds the time and the pid, different on every rank, and
torchrun offers no shared value that would name it the same on all ranks of a resume and of a fresh run
alike; so rank 0 claims it as a one-process run does and sends its path over the process group. On a resume
it sends it once it has checked and rewound the folder, and the other ranks copy the folder's own files
(regular files only, through safe_files) into their scratch folder, to resume from the same checkpoint.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .. import safe_files
from ..errors import ZobenchError
from .world import World, init_process_group

_CHUNK = 16 << 20
log = logging.getLogger(__name__)


_scratch: list[str] = []  # this process's scratch folder, once made (a rank other than 0 has one)


def scratch_folder(world: World) -> str:
    """A rank other than 0: its private scratch folder, made once per process and removed at exit."""
    if not _scratch:
        _scratch.append(tempfile.mkdtemp(prefix=f"zobench-rank{world.rank}-"))
        atexit.register(shutil.rmtree, _scratch[0], True)
    return _scratch[0]


def scratch_run_dir(argv: list[str], world: World) -> list[str]:
    """A torchrun rank other than 0: argv with hydra.run.dir pinned to its scratch folder."""
    from ..configs import pin_run_dir

    return pin_run_dir(argv, scratch_folder(world))


def rank_run_dir(world: World, job_dir: str) -> str:
    """Where this rank's run writes, given Hydra's job folder: rank 0 there; another rank in its scratch folder
    (a torchrun rank's job folder already is; a submitit task's is rank 0's, the same on every task of the job:
    Hydra fixes the sweep folder before submission, and the launcher's task_ranks writes Hydra's own files of
    that task into the scratch folder instead)."""
    return job_dir if world.main else scratch_folder(world)


@contextmanager
def joined(world: World, device_type: str):
    """The process group for the run's lifetime (a world of one joins none).

    When a rank dies, torchrun's agent sends SIGTERM to the others at once, as their collectives fail: a rank
    leaving its training loop with that error would be killed by it before its records are written. So
    outside the training loop (which stops after its step on SIGTERM, stop_signals.py) a torchrun rank logs
    and ignores SIGTERM; its collectives fail as soon as a peer's connection closes, which ends it."""
    import torch.distributed as dist

    if not world.distributed:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _ignored)
    init_process_group(world, device_type)
    try:
        yield
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            signal.signal(signal.SIGTERM, previous)


def _ignored(signum, frame) -> None:
    log.warning("signal %d: this rank ends with the job (a failed collective ends it)", signum)


def send_run_folder(world: World, path: Path, resuming: bool) -> None:
    """Rank 0, once its folder is claimed and (on a resume) checked and rewound: its path to the others,
    and whether they resume from it; returns when they have copied what they need."""
    if world.distributed:
        from .transport import broadcast_bytes

        broadcast_bytes((("R" if resuming else "N") + str(path)).encode())
        _barrier()


def follow_run_folder(world: World, scratch: Path) -> Path:
    """Another rank, before it claims its scratch folder: rank 0's folder, copied into `scratch` when the
    run resumes from it."""
    from .transport import broadcast_bytes

    message = broadcast_bytes(None).decode()
    lead = Path(message[1:])
    if message[0] == "R":
        _copy_run_files(lead, scratch)
    _barrier()
    return lead


def _copy_run_files(source: Path, target: Path) -> None:
    """The run's own files of `source` (Hydra's aside) into `target`: regular files only, never via a link."""
    from ..run_dir import HYDRA_OUTPUTS

    for name in sorted(os.listdir(source)):
        if name in HYDRA_OUTPUTS:
            continue
        here, there = source / name, target / name
        if here.is_symlink():
            raise ZobenchError(f"{here} is a symbolic link: zobench does not read links in a run directory")
        if here.is_dir():
            there.mkdir(exist_ok=True)
            _copy_run_files(here, there)
            continue
        fd = safe_files.open_regular(here)
        with os.fdopen(fd, "rb") as reader, safe_files.open_for_write(there, "wb") as writer:
            while chunk := reader.read(_CHUNK):
                writer.write(chunk)


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()
