"""Models and tokenizers: a hub id, a local directory, or a random init from the preset's `arch`.

Model presets (conf/model/*.yaml):
  init: pretrained   load `path` if set, else `hub_id` (AutoModelForCausalLM / AutoTokenizer)
  init: random       build from `arch` (a transformers config: model_type + sizes), seeded by init_seed
  tokenizer: null    the model's own; `byte`: zobench's offline byte-level tokenizer
  device_map: null   `auto` (or an accelerate device map) shards the model over the visible GPUs
  headroom_gib: 5    with device_map=auto: GiB left free on each GPU for activations and z's blocks
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import Interrupted, ZobenchError
from .hub import announce

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ZobenchError(f"device={name} asked for, but no CUDA device is visible; use device=auto or cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: fp16 on CUDA (as the papers run), fp32 on CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ZobenchError(f"unknown dtype '{name}'; valid: auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and DTYPES[name] == torch.float16:  # slow, but how the 16-bit paths are tested
        log.info("dtype=float16 on CPU: supported, slow (CPU kernels are not tuned for half precision)")
    return DTYPES[name]


def load_model(spec: dict[str, Any], device: torch.device, dtype: torch.dtype, max_length: int | None = None,
               empty: bool = False):
    """Returns (model in eval mode on `device`, or sharded by `device_map`, and its tokenizer). `max_length`:
    the run's, refused right after the model's config is read if the model has fewer positions. `empty`: a
    pretrained model's skeleton, its parameters on the meta device, for the ranks to shard and then fill
    (parallel/sharded_load.py)."""
    tokenizer = _load_tokenizer(spec)
    device_map = spec.get("device_map")
    random = spec.get("init", "pretrained") == "random"  # drawn whole on the host, `empty` or not
    if random:
        model = _random_model(spec, tokenizer, dtype, max_length)
    else:
        model = _pretrained_model(spec, dtype, max_length, empty)
    if tokenizer.pad_token_id is None:  # LLaMA has none; padded positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    if empty and not random:
        return model.eval(), tokenizer  # on the meta device: the ranks shard it, then read their shards
    if device_map:
        if device_map == "auto":
            device_map = auto_device_map(model, dtype, gpu_memory(), float(spec["headroom_gib"]))
        model = _dispatch(model, check_device_map(device_map))
    else:
        model = model.to(device)
    return model.eval(), tokenizer


def input_device(model) -> torch.device:
    """Where a batch goes: the device of the input embeddings (the first shard of a sharded model)."""
    return model.get_input_embeddings().weight.device


def _dispatch(model, device_map: dict[str, Any]):
    """accelerate places each block on a device; hooks move activations between them."""
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=device_map)


def gpu_memory() -> dict[int, int]:
    """Each visible GPU's memory in bytes, by index."""
    return {index: torch.cuda.get_device_properties(index).total_memory for index in range(torch.cuda.device_count())}


def auto_device_map(model, dtype: torch.dtype, gpus: dict[int, int], headroom_gib: float) -> dict[str, Any]:
    """accelerate's map of `model` over `gpus` (index -> bytes), each keeping `headroom_gib` free for the
    activations (the references leave ~5 GB a card). A model that would spill to the host or disk is refused
    here, in one line: accelerate would keep those weights on the meta device, where the engine cannot
    perturb them (it fails mid-step with "META device type not an accelerator")."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    if not gpus:
        raise ZobenchError("model.device_map=auto shards the model over the visible GPUs, and none is visible: "
                           "set model.device_map=null to run on one device")
    headroom = int(headroom_gib * 2**30)
    budget = {index: total - headroom for index, total in gpus.items()}
    if min(budget.values()) <= 0:
        raise ZobenchError(f"model.headroom_gib={headroom_gib} leaves nothing of a {min(gpus.values()) / 2**30:.1f} "
                           f"GiB GPU for the weights: lower model.headroom_gib")
    no_split = getattr(model, "_no_split_modules", None) or []
    # the host listed with room to spare, so that a model too large shows as modules mapped to "cpu"
    device_map = infer_auto_device_map(model, max_memory={**budget, "cpu": 1 << 50},
                                       no_split_module_classes=list(no_split), dtype=dtype)
    spilled = [name for name, where in device_map.items() if where in ("cpu", "disk")]
    if spilled:
        weights = compute_module_sizes(model, dtype=dtype)[""] / 2**30
        raise ZobenchError(
            f"model.device_map=auto: the model's {weights:.1f} GiB of weights do not fit on {len(gpus)} GPU(s) "
            f"with model.headroom_gib={headroom_gib} GiB kept free on each ({sum(budget.values()) / 2**30:.1f} GiB "
            f"for weights); {len(spilled)} modules ({spilled[0]}, ...) would be offloaded to the host, which zobench "
            f"does not run: use more or larger GPUs, a smaller model.headroom_gib, or dtype=float16/bfloat16")
    return device_map


def refuse_spill(spec: dict[str, Any], dtype: torch.dtype) -> None:
    """model.device_map=auto (`spec`: the model section) for a model whose config is at hand (a random init's
    arch, a local model.path's config.json): auto_device_map's refusal of a spill, or of no GPU, before any data
    is read (exit 2), the model built on the meta device from the config alone. A hub model's config is read
    with its weights, and refused there."""
    if spec.get("device_map") != "auto":
        return
    if spec.get("init", "pretrained") == "random":
        config = dict(spec.get("arch") or {})
    elif spec.get("path"):
        config = dict(local_model_config(str(spec["path"]))[0] or {})
    else:
        return
    model_type = config.pop("model_type", None)
    if not isinstance(model_type, str):
        return  # load_model says what is missing
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=dtype)
    except Interrupted:
        raise
    except Exception:  # a config transformers cannot build: load_model reports it
        return
    auto_device_map(model, dtype, gpu_memory(), float(spec["headroom_gib"]))


def check_device_map(device_map) -> dict[str, Any]:
    """An explicit map as accelerate runs it with zobench's engine: GPUs and/or the host, never "disk" or
    "meta", and the host only for the whole model (beside a GPU accelerate offloads its modules to meta)."""
    device_map = dict(device_map)
    places = {str(where) for where in device_map.values()}
    if places & {"disk", "meta"} or ("cpu" in places and len(places) > 1):
        raise ZobenchError(f"model.device_map puts modules on {', '.join(sorted(places))}: zobench runs a map over "
                           f"GPUs (or all on cpu); offloading to the host or disk is not supported: map every "
                           f"module to a GPU index, or use model.device_map=auto")
    return device_map


def model_source(spec: dict[str, Any]) -> str:
    """The preset's local folder (checked: it holds a model) or its hub id."""
    if spec.get("path"):
        return str(check_model_folder(spec))
    if not spec.get("hub_id"):
        raise ZobenchError(f"model preset '{spec.get('name')}' has neither hub_id nor path")
    return spec["hub_id"]


def bos_override(spec: dict[str, Any]) -> int | None:
    """The preset's `bos_token_id` for the Encoder (OPT: MeZO's 0); never with the byte tokenizer, whose
    ids are not the model's vocabulary."""
    value = spec.get("bos_token_id")
    return None if value is None or spec.get("tokenizer") == "byte" else int(value)


def load_tokenizer(spec: dict[str, Any]):
    """The preset's tokenizer alone, without the weights (for tools that only count tokens)."""
    return _load_tokenizer(spec)


def _load_tokenizer(spec: dict[str, Any]):
    if spec.get("tokenizer") == "byte":
        from .byte_tokenizer import byte_tokenizer

        return byte_tokenizer()
    from transformers import AutoTokenizer

    source = spec.get("tokenizer") or model_source(spec)
    _announce("tokenizer", source)
    try:
        return AutoTokenizer.from_pretrained(source)
    except Interrupted:  # Ctrl-C or SIGTERM while loading: the run's end, not an unreachable model
        raise
    except Exception as error:
        if spec.get("init") == "random" and not spec.get("tokenizer"):  # random weights need no hub but for this
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ZobenchError(f"model.init=random still loads the tokenizer '{source}' from the hub, which failed "
                               f"({reason}); offline, add model.tokenizer=byte (zobench's byte-level tokenizer) or "
                               f"model.tokenizer=/local/tokenizer/dir") from error
        raise _unreachable("tokenizer", source, error) from error


def _pretrained_model(spec: dict[str, Any], dtype: torch.dtype, max_length: int | None, empty: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    source = model_source(spec)
    _announce("model", source)
    try:
        config = AutoConfig.from_pretrained(source)
    except Interrupted:
        raise
    except Exception as error:
        raise _unreachable("model", source, error) from error
    if max_length is not None:
        check_positions(max_length, _positions(config), f"max_position_embeddings in the config of {source}")
    if empty:
        from .parallel.sharded_load import skeleton

        return skeleton(config, dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype)
    except Interrupted:
        raise
    except Exception as error:
        raise _unreachable("model", source, error) from error


def _random_model(spec: dict[str, Any], tokenizer, dtype: torch.dtype, max_length: int | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(spec.get("arch") or {})
    if "model_type" not in arch:
        raise ZobenchError(f"model preset '{spec.get('name')}' (init: random) needs arch.model_type")
    model_type = arch.pop("model_type")
    arch["vocab_size"] = max(int(arch.get("vocab_size", 0)), len(tokenizer))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, key.removesuffix("_id") + "_id", None)
        arch.setdefault(key, token_id)
    config = AutoConfig.for_model(model_type, **arch)
    if max_length is not None:
        check_positions(max_length, _positions(config),
                        f"model.arch.max_position_embeddings of model={spec.get('name')}")
    # the same initial weights whatever the run's seed, device or device map: drawn on the host (CPU and CUDA
    # generators draw different numbers), then moved or dispatched; a 13B init takes minutes there, not seconds
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(int(spec.get("init_seed", 0)))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def check_positions(max_length: int, positions: Any, where: str) -> None:
    """A model with fewer positions than max_length fails on the first long example (an IndexError in its
    position embeddings): refused up front, naming both keys."""
    if isinstance(positions, int) and not isinstance(positions, bool) and max_length > positions:
        raise ZobenchError(f"max_length={max_length} is more than the model's {positions} positions ({where}): "
                           f"set max_length={positions} or less")


def _positions(config) -> Any:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                   "vocab.txt")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.msgpack", "*.h5")


def check_model_folder(spec: dict[str, Any]) -> Path:
    """A local model.path holds what loading it needs; else one line saying what it lacks (the loaders' own
    errors name neither the key nor the files)."""
    path = Path(str(spec["path"])).expanduser()
    if not path.exists():
        raise ZobenchError(f"model.path={path} does not exist; point it at a save_pretrained folder")
    if not path.is_dir():
        raise ZobenchError(f"model.path={path} is not a folder; point it at a save_pretrained folder")
    lacks = []
    if spec.get("init", "pretrained") != "random":
        if not (path / "config.json").is_file():
            lacks.append("config.json")
        if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
            lacks.append("the weights (*.safetensors or *.bin)")
    if not spec.get("tokenizer") and not any((path / name).is_file() for name in TOKENIZER_FILES):
        lacks.append("the tokenizer's files (tokenizer.json or tokenizer_config.json, vocab.json, ...)")
    if lacks:
        what = "is empty" if next(path.iterdir(), None) is None else "is not a complete model folder"
        raise ZobenchError(f"model.path={path} {what}: it lacks {', '.join(lacks)}; expected a folder written by "
                           f"save_pretrained (model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR))")
    return path


def local_model_config(folder: str) -> tuple[dict[str, Any] | None, Path]:
    """The config.json of a local model folder (None: there is none), read as a file zobench did not write."""
    from .safe_files import read_json

    path = Path(folder).expanduser() / "config.json"
    if not path.is_file():
        return None, path
    config = read_json(path, limit=16 << 20)
    return (config if isinstance(config, dict) else None), path


def _announce(what: str, source: str) -> None:
    if not Path(source).expanduser().exists():  # a hub id, not a local folder
        announce(f"the {what} {source}", "model.path=/local/dir (a save_pretrained folder)")


def _unreachable(what: str, source: str, error: Exception) -> ZobenchError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ZobenchError(
        f"could not load the {what} '{source}' ({reason}); without hub access download it elsewhere and "
        f"set model.path=/local/dir (a save_pretrained folder), or use model=opt-tiny for an offline run"
    )


def trained_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The parameters training may change (requires_grad): with an adapter, the adapter alone. Saved
    copies of a run's weights (checkpoints, the best on dev) hold only these; tied weights appear once."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
