"""Which run a folder holds, and whether a run started into it goes on from its checkpoint."""

from __future__ import annotations

import logging
from typing import Any

from .checkpoint import Checkpointer
from .errors import ZobenchError
from .run_dir import RunDir, text_sha256
from .safe_files import YAML_LIMIT, read_text

log = logging.getLogger(__name__)


def resumable_state(directory: RunDir, config_yaml: str, world=None) -> dict[str, Any] | None:
    """`config_yaml`: the run's config.yaml text (RunSpec.config_yaml); `world`: the torchrun world (a sharded
    checkpoint is this rank's files). None for a fresh directory, or for an unfinished run that left no
    checkpoint (it starts again from step 0, what it recorded moved to attempts/N); else the checkpoint of an
    unfinished run made with the same config, its records rewound to it."""
    metrics = directory.read_json("metrics.json")
    if metrics is None:
        directory.refuse_leftovers()
        return None
    run_dir, status = directory.path, metrics.get("status")
    if status == "completed":
        raise ZobenchError(f"{run_dir} already holds a completed run; zobench never overwrites results")
    state = Checkpointer.load_state(directory, world)  # under torchrun (`world`): this rank's shards
    if state is None and status == "diverged":  # a result, as a completed run is
        raise ZobenchError(f"{run_dir} holds a diverged run that left no checkpoint; zobench never overwrites "
                           f"results: start a new run")
    saved = read_text(run_dir / "config.yaml", YAML_LIMIT) if (run_dir / "config.yaml").exists() else None
    if saved != config_yaml:
        raise ZobenchError(f"{run_dir} was started with another config; resume it as it was with "
                           f"`zobench resume={run_dir}`")
    if state is None:  # killed or failed before its first checkpoint: nothing to resume, nothing lost
        attempt = directory.set_aside_attempt()
        log.warning("the %s run in %s left no checkpoint: it starts again from step 0 (its records are kept "
                    "in %s)", status, run_dir, attempt)
        return None
    directory.fingerprint("config", saved)  # config.yaml edited to match another command line: refused
    directory.config_sha256 = text_sha256(saved)
    directory.rewind(state["records"], state["step"])
    log.info("resuming the %s run in %s from step %d", status, run_dir, state["step"])
    return state
