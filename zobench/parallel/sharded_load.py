"""A sharded model's weights read from its checkpoint's safetensors, each rank reading only its own rows.

Under torchrun, a run that shards θ (parallel.zo=shard, or a first-order method under parallel.fo=fsdp) of a
pretrained model never holds the whole model on one rank:

1. `skeleton`: the model built without memory, its parameters on the meta device (accelerate's
   init_empty_weights; buffers stay real, so a non-persistent buffer such as LLaMA's rotary `inv_freq` is
   computed as a normal load computes it);
2. the run shards it as it shards a loaded model (ranks.py: zo_shard.shard_for_zo, first_order.parallelize,
   the fp32 master weights of the 16-bit regime included): FSDP2 plans the shards of meta parameters;
3. `fill`: the local shards are allocated on the rank's device (`to_empty`), and each DTensor's rows
   (zo_shard.local_piece: torch.chunk's split) are read from the safetensors file that holds them,
   `get_slice(key)[first:last]`, and cast as from_pretrained casts (stored dtype -> the run's dtype -> the
   parameter's, fp32 for master weights). Checkpoint keys are mapped to the model's names by transformers' own
   renamings (conversion_mapping; base_model_prefix added or dropped); a tensor that cannot be mapped, or a
   parameter no file holds, is refused in one line naming it. Tied weights (OPT's lm_head and embeddings) are
   one Parameter: it is read once, under whichever of its names the file holds.
The result equals load-whole-then-shard bit for bit on every rank (tests/test_sharded_load.py). Host memory per
rank: one tensor's local rows at a time; device memory: θ/N.

Random-init models (model.init=random) keep the load-whole path: their init is drawn on the host in one
process's order. A LoRA adapter is added to the skeleton as to a loaded model, its init drawn on the host from the
run's seed (`adapters_drawn_on_host`), sharded with the model and kept, not read, by `fill`: it equals the
one-process adapter. Prefix tuning is refused (`check`): its prefix is computed through the whole model.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import Interrupted, ZobenchError
from .sharded_checkpoint import local
from .zo_shard import local_piece

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def streams(spec, plan) -> bool:
    """Whether this run loads each rank's shard only: θ sharded over more than one rank, pretrained weights.
    `plan`: the run's parallel plan (zo.ZOParallel)."""
    from .zo import SHARDED

    return plan.world.distributed and plan.mode in SHARDED and spec.model["init"] != "random"


def check(spec) -> None:
    """Refuses, in one line before anything loads, what the streamed load cannot do."""
    model = spec.model
    if spec.peft_name == "prefix":
        raise ZobenchError("peft=prefix with the weights sharded at load (parallel.zo=shard or parallel.fo=fsdp "
                           "under torchrun): its prefix is drawn through the whole model before the weights are "
                           "read; use peft=lora or peft=none, or parallel.zo=data/directions")
    if model.get("device_map"):
        raise ZobenchError("model.device_map places a whole model on one process's GPUs; with the weights sharded "
                           "over torchrun's ranks each rank loads its own shard: set model.device_map=null")
    if model.get("path"):
        weight_files(Path(str(model["path"])).expanduser())


def skeleton(config, dtype: torch.dtype) -> torch.nn.Module:
    """The model of `config` in `dtype` with every parameter on the meta device (no memory) and its buffers
    computed on the host, as from_pretrained computes them."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # init_empty_weights registers a meta Parameter per module: the tie is made here
    return model


@contextmanager
def adapters_drawn_on_host(model: torch.nn.Module):
    """While a LoRA adapter is added to the skeleton: peft draws the adapter's init on the host, then moves it to
    its base layer's device, where on the meta device its values would be lost. Inside, each meta parameter is a
    zero-stride host tensor of its shape and dtype (no memory), so the adapter stays on the host with the values
    one process draws; after, each is its meta Parameter again (requires_grad as peft set it)."""
    swapped = []
    for module in model.modules():
        for leaf, param in list(module._parameters.items()):
            if param is not None and param.device.type == "meta":
                stand_in = torch.nn.Parameter(torch.zeros((), dtype=param.dtype).expand(param.shape),
                                              requires_grad=param.requires_grad)
                module._parameters[leaf] = stand_in
                swapped.append((module, leaf, param, stand_in))
    try:
        yield
    finally:
        for module, leaf, param, stand_in in swapped:
            param.requires_grad_(stand_in.requires_grad)
            module._parameters[leaf] = param


def folder_of(source: str) -> Path:
    """The local folder of a model: `source` itself, or the hub's cached snapshot (its safetensors and JSON)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.safetensors", "*.json"]))
    except Interrupted:
        raise
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ZobenchError(f"could not fetch the safetensors of '{source}' ({reason}); without hub access download "
                           f"them elsewhere and set model.path=/local/dir (a save_pretrained folder)") from error


def weight_files(folder: Path) -> dict[str, Path]:
    """{checkpoint key: the safetensors file holding it}: the index of a sharded checkpoint, or the one file."""
    from .. import safe_files

    if (folder / INDEX).exists():
        index = safe_files.read_json(folder / INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ZobenchError(f"{folder / INDEX} has no weight_map of tensor names to file names")
        files = {}
        for key, name in weight_map.items():
            path = folder / name
            if Path(name).name != name or not path.exists():
                raise ZobenchError(f"{folder / INDEX} names {name!r} for {key}, which is not a file in {folder}")
            files[key] = path
        for path in set(files.values()):
            _check_regular(path)
        return files
    if (folder / SINGLE).exists():
        from safetensors import safe_open

        _check_regular(folder / SINGLE)
        with safe_open(str(folder / SINGLE), framework="pt") as single:
            return {key: folder / SINGLE for key in single.keys()}
    raise ZobenchError(f"{folder} holds no {SINGLE} nor {INDEX}: with the weights sharded at load zobench reads "
                       f"safetensors only (a .bin is a pickle); convert it (save_pretrained writes safetensors)")


def _check_regular(path: Path) -> None:
    """A weights file is a regular file (safe_files' rule: a FIFO or a device would block or never end)."""
    import os

    from .. import safe_files

    os.close(safe_files.open_regular(path))


def key_map(model: torch.nn.Module, keys) -> dict[str, str]:
    """{the model's tensor name: the checkpoint key that fills it}, by the renamings from_pretrained applies.
    A key that a transformers converter would reshape (fuse, split) is refused: its rows are not the file's."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = _tensor_names(model)
    mapped = {}
    for key in keys:
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
        if converted is not None:
            raise ZobenchError(f"checkpoint tensor {key}: transformers converts it at load ({converted}); "
                               f"zobench cannot read its rows per rank: run it without parallel.zo=shard/fsdp")
        mapped.setdefault(name, key)
    return mapped


def _tensor_names(model: torch.nn.Module) -> dict[str, bool]:
    """Every name a parameter or buffer answers to (tied ones under each of their names), as the base model
    names it (a LoRA-wrapped layer's `base_layer.` left out)."""
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    names += [name for name, _ in model.named_buffers(remove_duplicate=False)]
    return {base_name(name): True for name in names}


def base_name(name: str) -> str:
    """A tensor's name in the base model: peft's LoRA keeps the wrapped layer as `base_layer`."""
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def fill(model: torch.nn.Module, folder: Path, dtype: torch.dtype, device: torch.device) -> int:
    """Allocates the (sharded) skeleton's local shards on `device` and reads each rank's rows from `folder`'s
    safetensors; buffers keep the values the skeleton computed unless the checkpoint holds them. Returns the
    bytes of parameters read (this rank's rows, as stored)."""
    from safetensors import safe_open

    files = weight_files(folder)
    sources = key_map(model, files)
    aliases = _aliases(model)
    # drawn at init, not read: an adapter's parameters (adapters_drawn_on_host), this rank's rows kept
    drawn = {name: local(param).detach().clone() for name, param in model.named_parameters()
             if param.device.type != "meta"}
    wanted: dict[Path, list[tuple[str, str]]] = defaultdict(list)  # file: (parameter or buffer, key), by file
    for name, names in aliases.items():
        if name in drawn:
            continue
        key = next((sources[base_name(a)] for a in names if base_name(a) in sources), None)
        if key is None:
            raise ZobenchError(f"parameter {name} is in no safetensors file of {folder} (names tried: "
                               f"{', '.join(names)}): the checkpoint does not fit model.path's config")
        wanted[files[key]].append((name, key))
    kept = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    for name in kept:
        if base_name(name) in sources:
            wanted[files[sources[base_name(name)]]].append((name, sources[base_name(name)]))
    model.to_empty(device=device)
    _tie(model, aliases)  # to_empty gives each name its own tensor: tied ones become one Parameter again
    read = 0
    for path, tensors in wanted.items():
        with safe_open(str(path), framework="pt") as opened:  # one file mapped at a time
            for name, key in tensors:
                if name in kept:
                    buffer = model.get_buffer(name)
                    buffer.copy_(opened.get_slice(key)[:].to(dtype if buffer.is_floating_point() else buffer.dtype))
                else:
                    read += _read_rows(name, model.get_parameter(name), opened.get_slice(key), key, dtype)
    for name, value in kept.items():
        if base_name(name) not in sources:  # computed at init (LLaMA's inv_freq): the skeleton's value
            model.get_buffer(name).copy_(value)
    for name, value in drawn.items():
        local(model.get_parameter(name)).copy_(value)
    return read


def _aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """{a parameter's first name: every name it answers to} (a tied Parameter has several)."""
    first: dict[int, str] = {}
    names: dict[str, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(first.setdefault(id(param), name), []).append(name)
    return names


def _tie(model: torch.nn.Module, aliases: dict[str, list[str]]) -> None:
    """Every name of a tied parameter set to the Parameter of its first name."""
    for first, names in aliases.items():
        param = model.get_parameter(first)
        for name in names[1:]:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = param


def _read_rows(name: str, param: torch.Tensor, source, key: str, dtype: torch.dtype) -> int:
    """This rank's rows of `param` (a DTensor sharded on dim 0, or a whole tensor) from the file's `source`;
    returns the bytes read."""
    shape = list(source.get_shape())
    if shape != list(param.shape):
        raise ZobenchError(f"checkpoint tensor {key} has shape {shape}, the model's {name} {list(param.shape)}: "
                           f"the checkpoint does not fit model.path's config")
    piece = local_piece(name, param)
    if piece is None:
        mine, first, count = param, 0, param.shape[0] if param.dim() else None
    else:
        mine, start, _ = piece
        row = max(1, math.prod(param.shape[1:]))
        first, count = start // row, mine.shape[0] if param.dim() else None
    if count == 0:
        return 0  # this rank holds none of its rows
    rows = source[first:first + count] if count is not None else source[:]
    # from_pretrained's cast (stored -> the run's dtype), then the parameter's own (fp32 master weights)
    mine.copy_(rows.to(dtype).to(mine.dtype))
    return rows.numel() * rows.element_size()
