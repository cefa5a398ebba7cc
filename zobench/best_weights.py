"""Keep the best-on-dev weights until the test evaluation (MeZO: HF load_best_model_at_end).

  disk  safetensors file in the run directory, written tensor by tensor: no copy of the model in (GPU or
        host) memory. FSDP2 shards (parallel.fo=fsdp, parallel.zo=shard): a file per rank of its own shards,
        `best_weights.rank<r>.safetensors`, written by rank 0, which owns the run folder (the checkpoint's
        per-rank format, parallel/sharded_checkpoint.py; each rank's shard passes through host memory once, as
        a checkpoint's does); their sizes and SHA-256 go into the checkpoint, and the test reads each back
        into its rank, checked
  host  a copy in host RAM: faster; needs RAM for one more copy of the trained weights (one, reused by
        every later save); FSDP2: each rank its own shards
  none  test the final weights
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from .models import trained_parameters
from .parallel import sharded_checkpoint as shards
from .parallel.sharded_checkpoint import local
from .parallel.world import World

MODES = ("disk", "host", "none")
FILE = "best_weights.safetensors"  # FSDP2: best_weights.rank<r>.safetensors, one per rank
log = logging.getLogger(__name__)


class BestWeights:
    def __init__(self, model: torch.nn.Module, mode: str, run_dir, step=lambda: None, world: World = World()):
        """`run_dir`: the RunDir (its run id goes into the file's metadata; a bare path: none); `step()` says
        which step the weights being saved belong to (kept in the file's metadata too); `world`: the ranks of
        a torchrun job (FSDP2 shards: a file per rank, all written in rank 0's run folder)."""
        if mode not in MODES:
            from .errors import ZobenchError

            raise ZobenchError(f"train.keep_best must be one of {', '.join(MODES)}, got {mode}")
        self.model, self.mode, self.world = model, mode, world
        self.sharded = world.distributed and shards.is_sharded(model)
        self.directory = run_dir if hasattr(run_dir, "file_metadata") else None
        self.path = Path(getattr(run_dir, "path", run_dir)) / FILE
        self._host: dict[str, torch.Tensor] | None = None
        self.saved = False
        self.step = step
        self.sha256: str | None = None  # of the file on disk, checked before it is loaded
        self.files: dict[str, dict] | None = None  # FSDP2: each rank's file's bytes and SHA-256 (rank 0's record)
        self.saved_step: int | None = None

    def _parameters(self) -> dict[str, torch.nn.Parameter]:
        return trained_parameters(self.model)  # frozen weights (an adapter's base model) never change

    @torch.no_grad()
    def save(self, step: int | None = None) -> None:
        """Tensor by tensor: disk streams each to the file (tensor_files), host copies each into the buffers of
        the last save (a second full copy never exists beside the first)."""
        step = self.step() if step is None else step
        if self.mode == "host":
            params = {n: local(p).detach() for n, p in self._parameters().items()}  # a rank's shards under FSDP2
            if self._host is None or self._host.keys() != params.keys():
                self._host = {n: torch.empty_like(p, device="cpu") for n, p in params.items()}
            for name, param in params.items():
                self._host[name].copy_(param)
        elif self.mode == "disk":
            from .run_dir import atomic_write
            from .tensor_files import write_safetensors

            metadata = self.directory.file_metadata(step) if self.directory is not None else {"step": str(step)}
            if self.sharded:  # every rank's shards, written by rank 0 (a collective: every rank saves)
                self.files = shards.write_rank_files(FILE, self._parameters(), self.world, self.path.parent, metadata)
                self.saved_step, self.saved = step, True
                return
            digest = {}

            def write(tmp):
                digest["sha256"] = write_safetensors(tmp, self._parameters(), metadata)[1]

            atomic_write(self.path, write)  # run_dir's one writer of whole files
            self.sha256, self.saved_step = digest["sha256"], step
        self.saved = self.mode != "none"

    def record(self) -> dict | None:
        """What a checkpoint keeps of the file on disk, to check it on a resume."""
        if self.mode != "disk" or not self.saved:
            return None
        if self.sharded:
            return {"step": self.saved_step, "files": self.files}
        return {"step": self.saved_step, "sha256": self.sha256}

    def adopt_saved(self, best_step: int, recorded: dict | None) -> bool:
        """After a resume from saved weights: is the best-on-dev copy of `best_step` still there? (disk: yes,
        unless a kill came between a later best's save and that step's checkpoint). `recorded`: the
        checkpoint's record() of it. A file of another run, or one whose bytes changed, is refused."""
        if self.mode == "disk" and self.sharded:
            self.saved = self._adopt_shards(best_step, recorded)
        elif self.mode == "disk":
            self.saved = False
            if self.path.exists() or self.path.is_symlink():
                step = self.directory.check_own_file(self.path)  # another run's file: refused
                if recorded is not None and step == best_step == recorded["step"]:
                    self.sha256, self.saved_step = recorded["sha256"], step
                    self._check_hash()
                    self.saved = True
        return self.mode == "none" or self.saved

    def _adopt_shards(self, best_step: int, recorded: dict | None) -> bool:
        """adopt_saved's answer for a file per rank, the same on every rank: each checks the files' run id and
        step in its copy of rank 0's folder (a resumed rank's copy, zobench/parallel/launch.py), then rank 0
        checks their sizes and SHA-256 for all (again when it reads them for the test: read_rank_files)."""
        names = [shards.rank_file(FILE, rank) for rank in range(self.world.size)]
        files = (recorded or {}).get("files")
        if recorded is None or recorded["step"] != best_step or not isinstance(files, dict) or set(files) != set(names):
            return False
        for name in names:
            path = self.path.parent / name
            if not (path.exists() or path.is_symlink()) or self.directory.check_own_file(path) != best_step:
                return False  # a kill between two ranks' files, or before the checkpoint that records them
        shards.check_rank_files(FILE, files, self.path.parent, self.world)
        self.files, self.saved_step = files, best_step
        return True

    def _check_hash(self) -> None:
        from .errors import ZobenchError
        from .run_dir import file_sha256

        if self.sha256 is not None and file_sha256(self.path) != self.sha256:
            raise ZobenchError(f"{self.path} does not match the SHA-256 recorded when it was saved: the file is "
                               f"corrupt or was modified; zobench will not test those weights (remove it to "
                               f"test the best of the evaluations from the resume on)")

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved weights back tensor by tensor, then drop the copy."""
        if not self.saved:
            return
        params = self._parameters()
        if self.mode == "disk" and self.sharded:
            self._restore_shards(params)
        elif self.mode == "host":
            for name, value in self._host.items():
                local(params[name]).copy_(value)  # FSDP2: this rank's shard
            self._host = None
        else:
            from safetensors import safe_open

            self._check_hash()
            with safe_open(str(self.path), framework="pt") as saved:
                for name in saved.keys():
                    params[name].copy_(saved.get_tensor(name))
            self._unlink()
        self.saved = False

    def _restore_shards(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Each rank's shards back from its file in rank 0's folder (read, checked and sent by rank 0)."""
        from .errors import ZobenchError

        saved = shards.read_rank_files(FILE, self.files, self.path.parent, self.world)
        if saved.keys() != params.keys():
            raise ZobenchError(f"{self.path.parent}: the best-on-dev shard of rank {self.world.rank} holds other "
                               f"parameters than the model trains; zobench will not test it")
        for name, value in saved.items():
            shard = local(params[name])
            if value.shape != shard.shape:
                raise ZobenchError(f"{self.path.parent}: {name} in the best-on-dev shard of rank {self.world.rank} "
                                   f"has shape {tuple(value.shape)}, the rank's shard {tuple(shard.shape)}")
            shard.copy_(value)
        self._unlink()

    def _unlink(self) -> None:
        """The kept file(s): FSDP2's one per rank (on a rank other than 0: its scratch folder's copies)."""
        if self.sharded:
            for rank in range(self.world.size):
                (self.path.parent / shards.rank_file(FILE, rank)).unlink(missing_ok=True)
        else:
            self.path.unlink(missing_ok=True)

    def discard(self) -> None:
        self._host = None
        if self.mode == "disk":
            self._unlink()


class BestOnDev:
    """The best dev evaluation so far and its weights (kept by BestWeights), which the test scores.

    The first evaluation offered always becomes the best. keep_best=none tests the final weights: the dev
    figures are the latest evaluation's (the last step, or the early stop's, is always evaluated), so they
    describe the weights the test scores.
    """

    def __init__(self, model: torch.nn.Module, mode: str, directory, record, select_by: str = "loss",
                 world: World = World()):
        """`record`: the RunRecord that notes the best's dev figures in metrics.json; `world`: the torchrun
        job's ranks (BestWeights)."""
        self.record, self.select_by = record, select_by
        self.weights = BestWeights(model, mode, directory, step=lambda: record.metrics["steps"], world=world)
        self.score = math.inf

    @property
    def mode(self) -> str:
        return self.weights.mode

    def offer(self, result: dict, step: int) -> bool:
        """Keep the weights of `step` if its dev `result` is the best so far; returns whether it was."""
        score = result["loss"] if self.select_by == "loss" else -result["metric"]
        if not (score < self.score or self.mode == "none"):
            return False
        self.score = score
        self.weights.save()
        self.record.note(dev_metric=result["metric"], dev_loss=result["loss"], best_step=step)
        self.record.save()
        return True

    def resume(self, checkpointer, state: dict) -> int:
        """Model and method back to the checkpoint `state` (checkpoint.Checkpointer), the best on dev with
        them; returns the checkpoint's step. Best weights lost in the stop: the next evaluation becomes the best."""
        best_step = self.record.metrics["best_step"]
        self.load_state_dict(state["job"])
        if not checkpointer.restore(state, self.weights, best_step):
            log.warning("the best-on-dev weights (step %s) did not survive the stop (train.keep_best=%s); "
                        "the test uses the best of the evaluations from now on", best_step, self.mode)
            self.score = math.inf
        log.info("resumed at step %d (%s checkpoint)", state["step"], state["mode"])
        return state["step"]

    def restore(self) -> None:
        """The best weights back into the model, for the test."""
        self.weights.restore()

    def discard(self) -> None:
        self.weights.discard()

    def state_dict(self) -> dict:
        """The checkpoint's job state keeps the score and the file's step and SHA-256."""
        return {"best_score": self.score, "best_weights": self.weights.record()}

    def load_state_dict(self, state: dict) -> None:
        self.score = state["best_score"]
