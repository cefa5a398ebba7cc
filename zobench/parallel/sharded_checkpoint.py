"""Checkpoints of a run over several ranks, in zobench's checkpoint format (checkpoint.py): safetensors + JSON,
no pickle anywhere (torch's distributed checkpoint writes its metadata as a pickle: not used here).

Rank 0 owns the run folder, so the ranks move bytes, not files: each rank serializes its own tensors with
safetensors and sends them to rank 0, which writes them as that rank's files (FSDP2: `state.rank<r>.safetensors`
and `weights.rank<r>.safetensors`, each rank's local shards of the parameters and of the optimizer state) with
their SHA-256 in the manifest; bytes travel as uint8 tensors (on the device for NCCL), one file at a time.
On resume every rank reads its copy of rank 0's folder (zobench/parallel/launch.py), checks every file against
the manifest as a one-process run does, and loads its own rank's files, which fit only the world size that
saved them. DDP's ranks hold the same weights: rank 0 saves them as a one-process run does, and every rank
restores from those files.

The same per-rank files keep FSDP2's best-on-dev weights (best_weights.py, `write_rank_files` /
`read_rank_files`): rank 0 writes `best_weights.rank<r>.safetensors` and, for the test, reads each back through
safe_files, checks its SHA-256 and sends it to its rank. save_model=true (`save_model_folder`) gathers the
parameters one at a time into the save_pretrained folder a one-process run writes.
"""

from __future__ import annotations

import torch

from ..errors import ZobenchError
from .transport import recv_bytes, send_bytes

STATE, WEIGHTS = "state.safetensors", "weights.safetensors"  # checkpoint.py's one-process file names


def is_sharded(model: torch.nn.Module) -> bool:
    """Are the model's parameters FSDP2 shards (DTensors)?"""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (the tensor itself otherwise)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def rank_file(name: str, rank: int) -> str:
    """`state.safetensors` -> `state.rank1.safetensors`: rank `rank`'s part of a sharded checkpoint."""
    stem, _, suffix = name.partition(".")
    return f"{stem}.rank{rank}.{suffix}"


def full_weights(model: torch.nn.Module, keep: bool = True, trained_only: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter whole, on the CPU (a collective: all ranks call it); `keep` False: gathered one by one
    and dropped (a rank that only helps another gather them); `trained_only`: the trained ones alone (an
    adapter's)."""
    weights = {}
    for name, param in model.named_parameters():
        if trained_only and not param.requires_grad:
            continue
        whole = _whole(param)
        if keep:
            weights[name] = whole.cpu().clone()
    return weights


def save_model_folder(directory, world, saveable, model: torch.nn.Module, tokenizer) -> str | None:
    """save_model=true: the tested weights (with PEFT: the adapter alone) written to the run folder's `model`,
    moved into place once complete; rank 0's alone (an FSDP2 model's shards are gathered whole by every rank,
    rank 0 writing). Returns the folder, None on a rank that writes none."""
    if not (world.main or is_sharded(model)):
        return None
    return str(directory.save_folder(
        "model", lambda partial: (save_pretrained(saveable, model, partial), tokenizer.save_pretrained(partial))))


def save_pretrained(saveable, model: torch.nn.Module, folder) -> None:
    """`saveable.save_pretrained(folder)` (save_model=true), the folder a one-process run writes, by rank 0 (the
    others' folders are their scratch ones). An FSDP2 model's parameters are gathered whole one at a time, every
    rank taking part: a model's go to model.safetensors one by one as they arrive (`_save_whole_model`), so no
    rank holds the model whole; a PEFT adapter's trained parameters are kept by rank 0 and handed to
    PeftModel.save_pretrained, which keeps the adapter's keys of the state dict it is given."""
    if not is_sharded(model):
        saveable.save_pretrained(folder)
        return
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    main = dist.get_rank() == 0
    if not hasattr(saveable, "peft_config"):
        _save_whole_model(saveable, folder, main)
        return
    weights = full_weights(saveable, keep=main, trained_only=True)
    # a prompt-learning adapter (prefix) is saved from its encoder's forward, not from the state dict: the root
    # unit (which holds it) gathered whole for the save, as a forward gathers it
    root = model if isinstance(model, FSDPModule) else None
    if root is not None:
        root.unshard()
    try:
        if main:
            saveable.save_pretrained(folder, state_dict=weights)
    finally:
        if root is not None:
            root.reshard()


MODEL_FILE = "model.safetensors"  # transformers' SAFE_WEIGHTS_NAME: what a one-process save_pretrained writes


@torch.no_grad()
def _save_whole_model(model: torch.nn.Module, folder, main: bool) -> None:
    """A sharded model's save_pretrained folder with its weights streamed: transformers writes everything but
    the weights (config, generation config; given no tensors), then rank 0 writes model.safetensors from the
    parameters' shapes and dtypes, gathering each whole only when its bytes are due (tensor_files), the other
    ranks gathering with it in the same order. The names are the state dict's, a tied head once under its
    embedding's name (named_parameters lists it once, as save_pretrained keeps it); the metadata is
    transformers' own ({"format": "pt"})."""
    from pathlib import Path

    from ..tensor_files import write_safetensors

    params = dict(model.named_parameters())
    if not main:
        for param in params.values():
            _whole(param)
        return
    model.save_pretrained(folder, state_dict={})
    write_safetensors(Path(folder) / MODEL_FILE, params, {"format": "pt"}, fetch=_whole)


def _whole(param: torch.Tensor) -> torch.Tensor:
    """A parameter whole where it lives (an FSDP2 shard: gathered, a collective)."""
    return (param.full_tensor() if hasattr(param, "full_tensor") else param).detach()


@torch.no_grad()
def shard_state_like_params(optimizer: torch.optim.Optimizer) -> None:
    """After load_state_dict from local shards: each state tensor of a DTensor parameter becomes a DTensor laid
    out as the parameter (torch keeps them plain, and the next step would mix Tensor and DTensor)."""
    from torch.distributed.tensor import DTensor

    for param, state in optimizer.state.items():
        if not isinstance(param, DTensor):
            continue
        shape = param.to_local().shape
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == shape \
                    and value.dim() > 0:
                state[key] = DTensor.from_local(value.to(param.device), param.device_mesh, param.placements,
                                                run_check=False, shape=param.shape, stride=param.stride())


# -- saving: each rank's tensors to rank 0 ---------------------------------------------------------------------
def _serialized(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: local(v).detach().contiguous().cpu() for k, v in tensors.items()})


def gather_files(files: dict[str, dict[str, torch.Tensor]], world) -> dict[str, object] | None:
    """Rank 0: {file name: tensors, or a callable that receives them}, every rank's files of a sharded
    checkpoint in the order rank 0 will write them (it receives rank r's files as it writes them, so it holds
    one rank's at a time); the other ranks send theirs and get None."""
    from safetensors.torch import load

    names = sorted(files)
    if not world.main:
        for name in names:
            send_bytes(_serialized(files[name]), 0)
        return None
    gathered: dict[str, object] = {rank_file(name, 0): {k: local(v) for k, v in files[name].items()}
                                   for name in names}
    for rank in range(1, world.size):
        for name in names:
            gathered[rank_file(name, rank)] = lambda rank=rank: load(recv_bytes(rank))
    return gathered


def tensors_of(saved) -> dict[str, torch.Tensor]:
    """One file's tensors in gather_files' answer: the tensors, or a callable that receives them (a rank's shards,
    received as rank 0 writes them)."""
    return saved() if callable(saved) else saved


# -- files of one kind per rank, outside a checkpoint (best_weights.py's best-on-dev shards) ---------------------
def write_rank_files(name: str, tensors: dict[str, torch.Tensor], world, folder, metadata: dict[str, str]) \
        -> dict[str, dict] | None:
    """Every rank's `tensors` as `<name>.rank<r>` files in rank 0's `folder` (a collective: all ranks call it):
    rank 0 streams its own to disk (tensor_files) and writes each other rank's as it receives them, each file
    swapped in atomically; returns {file: {"bytes", "sha256"}} there, None on the other ranks."""
    from ..run_dir import atomic_write
    from ..tensor_files import write_safetensors

    gathered = gather_files({name: tensors}, world)
    if gathered is None:
        return None
    written: dict[str, dict] = {}
    for file, saved in gathered.items():
        def write(tmp, file=file, saved=saved):
            size, digest = write_safetensors(tmp, tensors_of(saved), metadata)
            written[file] = {"bytes": size, "sha256": digest}

        atomic_write(folder / file, write)
    return written


def read_rank_files(name: str, files: dict[str, dict] | None, folder, world) -> dict[str, torch.Tensor]:
    """This rank's tensors of the `<name>.rank<r>` files in rank 0's `folder` (a collective; `files`, rank 0's:
    {file: {"bytes", "sha256"}}, as write_rank_files returned it; a file it does not name is missing). Rank 0 reads each file through
    safe_files (a regular file, no larger than recorded), checks its SHA-256 on the bytes it read and sends
    them to their rank; a file that fails is refused on every rank in one line, before any rank loads a tensor.
    safetensors parses the bytes: no pickle."""
    from safetensors.torch import load

    from .transport import broadcast_bytes

    mine, problem = b"", ""
    if world.main:
        for rank in range(world.size):
            file = rank_file(name, rank)
            data = b"" if problem else _checked_bytes(folder / file, files.get(file))
            if isinstance(data, str):
                problem, data = data, b""
            if rank == 0:
                mine = data
            else:
                send_bytes(data, rank)
        problem = broadcast_bytes(problem.encode()).decode()
    else:
        mine = recv_bytes(0)
        problem = broadcast_bytes(None).decode()
    if problem:
        raise ZobenchError(problem)
    return load(mine)


def check_rank_files(name: str, files: dict[str, dict], folder, world) -> None:
    """Rank 0 checks each `<name>.rank<r>` file in its `folder` against `files` ({file: {"bytes", "sha256"}}),
    reading it in chunks; a file that fails is refused on every rank, in one line (a collective)."""
    from ..run_dir import file_sha256
    from .transport import broadcast_bytes

    problem = ""
    if world.main:
        for rank in range(world.size):
            path, entry = folder / rank_file(name, rank), files.get(rank_file(name, rank))
            size = path.stat().st_size if path.is_file() and not path.is_symlink() else -1
            if entry is None or size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
                problem = (f"{path} is not the file recorded when the best-on-dev weights were saved (its size or "
                           f"SHA-256 differs): the file is corrupt or was modified; zobench will not test those "
                           f"weights (remove it to test the best of the evaluations from the resume on)")
                break
    problem = broadcast_bytes(problem.encode() if world.main else None).decode()
    if problem:
        raise ZobenchError(problem)


def _checked_bytes(path, entry: dict | None) -> bytes | str:
    """The file's bytes if they are the ones recorded (size, SHA-256); else why not, in one line."""
    import hashlib

    from .. import safe_files

    if entry is None:
        return f"{path}: the run recorded no such file of the best-on-dev weights; zobench will not test them"
    try:
        data = safe_files.read_bytes(path, entry["bytes"])
    except FileNotFoundError:
        return f"{path} is missing: zobench cannot test the best-on-dev weights it recorded there"
    except ZobenchError as error:
        return str(error)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return (f"{path} does not match the SHA-256 recorded when it was saved: the file is corrupt or was "
                f"modified; zobench will not test those weights")
    return data


# -- loading: each rank its own files ------------------------------------------------------------------------
def own_files(state: dict, paths: dict, world) -> dict:
    """{one-process file name: path} of this rank's files in a checked checkpoint (every rank resumes from a copy
    of rank 0's folder, zobench/parallel/launch.py): a sharded checkpoint's `<name>.rank<r>` files, which fit
    only the world size that saved them; a one-process or DDP checkpoint's files themselves."""
    saved = state.get("shards", 1)
    if saved == 1:
        return dict(paths)
    if saved != world.size:
        raise ZobenchError(f"{next(iter(paths.values())).parent}: the checkpoint holds the shards of {saved} ranks, "
                           f"this run has {world.size}: resume with torchrun --nproc_per_node={saved} (the world "
                           f"size that saved it)")
    mine = {name: rank_file(name, world.rank) for name in (STATE, WEIGHTS)}
    return {name: paths[file] for name, file in mine.items() if file in paths}
