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


def full_weights(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Every parameter whole, on the CPU (a collective: all ranks call it); `keep` False: gathered one by one
    and dropped (a rank that only helps another gather them)."""
    weights = {}
    for name, param in model.named_parameters():
        whole = (param.full_tensor() if hasattr(param, "full_tensor") else param).detach()
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
    """`saveable.save_pretrained(folder)` (save_model=true); an FSDP2 model's shards gathered whole first, which
    every rank takes part in, and written by rank 0 alone (the others' folders are their scratch ones)."""
    if not is_sharded(model):
        saveable.save_pretrained(folder)
        return
    if saveable is not model:
        raise ZobenchError("save_model=true does not gather an adapter's FSDP2 shards yet: save the adapter from a "
                           "one-process run, or set save_model=false")
    import torch.distributed as dist

    main = dist.get_rank() == 0
    weights = full_weights(model, keep=main)
    if main:
        saveable.save_pretrained(folder, state_dict=weights)


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
