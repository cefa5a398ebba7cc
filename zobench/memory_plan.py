"""The memory and disk a run needs, worked out before it starts (`zobench-plan --memory`), from plain values.

`model_shape` builds the model from its config on the meta device (no weights, no download); `plan` turns a
`JobShape` (the model's shape, the method, precision, batch, max_length, parallel mode) into bytes per GPU by
part, the GPUs of a given size it needs, host memory and disk. plan.py reads the config; nothing here does.

The formulas (e: bytes of an activation element, the weights' dtype or autocast's 16-bit; r: sequences in a
batch, examples x candidates for classification; s: max_length, the worst case; h, f, L, V: hidden size, MLP
size, layers, vocabulary):
- weights: every parameter in the weights' dtype; first-order torch optimizers with 16-bit weights and
  precision.master_weights hold the trained ones in fp32 instead (master copy: the 4 - e extra bytes, plus
  autocast's 16-bit copies of them during the step, e bytes).
- gradients: torch optimizers, one per trained parameter in its dtype; IP-SGD and Addax apply each gradient as
  it is accumulated: the largest trained tensor's, in update_dtype (Addax with parallel.zo=shard: the sharded
  gradients held until the step, parallel/in_place.py, and one unit's unsharded ones reduce-scattered in fp32).
  Zeroth-order methods: none.
- optimizer state: Adam/AdamW 2 tensors per trained parameter, SGD with momentum 1 (in the trained weights'
  dtype); stateful ZO methods (ZO-Adam, ZO-SGD-momentum) their state_names in precision.state_dtype.
- activations, inference (ZO steps, evaluation): one layer at a time, r*s*(4h + 2f)*e (hidden state, residual,
  q/k/v, the MLP's two f-wide tensors), plus the logits at the option tokens only (objective.py), r*o*V*(e + 8)
  with the loss's fp32 upcast (o = OPTION_TOKENS per sequence, a bound; e + 2e for loss_dtype=weights); a
  generation task's evaluation adds its KV cache, 2*L*r*s*h*e. sdpa attention keeps no s x s score matrix
  (eager attention would add r*a*s^2*2e).
- activations, backward (first-order): what backward keeps per layer, L*r*s*(10h + 2f)*e (Korthikanti et al.
  2022's count with sdpa attention, dropout masks left out), plus the option tokens' logits, their fp32
  log-softmax and its gradient, r*o*V*(e + 12).
- z block: the ZO engine's block buffers (engine.block_size elements: 16M on CUDA, 1M per thread on CPU),
  one in the weights' dtype and one fp32 working block, plus one fp32 block per state tensor.
- runtime: on GPU the CUDA context and kernels' workspace (RUNTIME_GPU, an estimate); on CPU the resident
  memory of this process with torch and transformers loaded, measured as the plan runs.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ZobenchError

RUNTIME_GPU = 800 * 2**20  # CUDA context + cuBLAS workspace + allocator slack: what nvidia-smi shows beyond tensors
MAX_GPUS = 4096
TRAJECTORY_LINE = 90  # bytes of a trajectory.jsonl line with its checksum, before the loss values
LOSS_VALUE = 22  # bytes per recorded loss value (a float printed by json) and per direction entry
LOG_LINE = 170  # bytes of a log.jsonl train or eval line
SAFETENSORS_HEADER = 64 * 1024  # per safetensors file: its JSON header (names, shapes, offsets), a bound
OPTION_TOKENS = 8  # tokens per sequence whose logits the objective computes (the answer's), a bound


@dataclass(frozen=True)
class ModelShape:
    """What the arithmetic needs of a model, read from its config and its meta-device parameters."""
    name: str
    params: int  # every parameter (tied weights once)
    trained: int  # those with requires_grad (the adapter alone under PEFT)
    largest_trained: int  # elements of the largest trained tensor (IP-SGD's one live gradient)
    unit: int  # elements of the largest decoder layer (FSDP's unit, gathered in full for its forward)
    hidden: int
    ffn: int
    layers: int
    heads: int
    vocab: int
    source: str  # where the config came from (the preset's arch, a local config.json, the hub)


@dataclass(frozen=True)
class MethodShape:
    """How an optimizer uses memory. kind: zo | torch | inplace | addax | evaluation."""
    name: str
    kind: str
    states: int = 0  # full-size state tensors per trained parameter
    directions: int = 1  # ZO directions per step (q): loss values per step are 2q


@dataclass(frozen=True)
class JobShape:
    """One job's memory-relevant settings, plain values only."""
    model: ModelShape
    method: MethodShape
    device: str  # cuda | cpu
    weights_bytes: int  # 4 | 2
    master_weights: bool  # fp32 master weights under 16-bit autocast (first-order torch optimizers)
    state_bytes: int  # stateful ZO optimizers' state element (precision.state_dtype)
    update_bytes: int  # in-place first-order arithmetic (precision.update_dtype)
    loss_fp32: bool  # precision.loss_dtype == float32
    train_rows: int  # sequences per training batch (examples x candidates)
    eval_rows: int  # sequences per evaluation batch
    max_length: int
    generation: bool  # the task is scored by generation (evaluation keeps a KV cache)
    parallel: str  # single | data | directions | shard | fsdp | ddp | device_map
    steps: int
    log_interval: int
    checkpoint_weights: bool  # checkpoint.weights (ZO runs); first-order runs always save them
    keep_best: str  # disk | host | none
    save_model: bool
    peft: str
    threads: int = 1  # CPU threads sharing the ZO engine's blocks
    pretrained: bool = True  # model.init=pretrained: sharded modes read each rank's rows only (sharded_load.py)
    micro_batches: int = 1  # train.grad_accumulation: a backward holds one micro-batch's activations


@dataclass
class Plan:
    """Bytes by part for one GPU (or the host, for a CPU run), with what follows from them."""
    job: JobShape
    gpus: int | None  # GPUs of `gpu_memory` it needs (None: does not fit in any number of them this mode allows)
    gpu_memory: int
    per_gpu: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    disk: dict[str, int] = field(default_factory=dict)
    note: str = ""

    def record(self) -> dict[str, Any]:
        """The plan as JSON (zobench-plan --json)."""
        job = asdict(self.job)
        return {"model": job.pop("model"), "method": job.pop("method"), "settings": job, "gpus": self.gpus,
                "gpu_memory_bytes": self.gpu_memory, "per_gpu_bytes": self.per_gpu, "host_bytes": self.host,
                "disk_bytes": self.disk, "note": self.note}


# -- sizes ------------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'80GB' (10^9), '80GiB' (2^30), '512MB', '80' (GB): bytes; anything else one line."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ZobenchError(f"--gpu-memory {text}: give a size such as 80GB, 80GiB or 40960MiB")
    number, prefix, binary = float(match.group(1)), match.group(2).upper() or "G", bool(match.group(3))
    power = "KMGT".index(prefix) + 1
    return int(number * (1024 if binary else 1000) ** power)


def human(size: int | float) -> str:
    """Bytes in GB (10^9, as the papers and GPU names count) below 1 TB, else TB; kB below 1 MB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if abs(size) >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1e3:.1f} kB"


def count(number: int) -> str:
    """12.85B, 26.4M, 5.2k."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if number >= scale:
            return f"{number / scale:.{2 if unit == 'B' else 1}f}{unit}"
    return str(number)


# -- the model, on the meta device --------------------------------------------------------------------
def model_shape(name: str, config, peft: dict[str, Any] | None, source: str) -> ModelShape:
    """Builds the model of `config` (a transformers config) with the run's adapter on the meta device: shapes
    only, nothing allocated, nothing downloaded."""
    import torch
    from transformers import AutoModelForCausalLM

    from .models import trained_parameters
    from .peft_adapters import apply_peft

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft's and transformers' deprecation notes
        model = AutoModelForCausalLM.from_config(config)
        if peft and peft.get("name", "none") != "none":
            peft = {**peft, "init": "random"}  # the real-activation init runs the model: the same shapes either way
            model, _ = apply_peft(model, peft, seed=0)
    params = {id(p): p.numel() for p in model.parameters()}  # tied weights once
    trained = trained_parameters(model)
    units = [m for m in model.modules() if type(m).__name__ in set(getattr(model, "_no_split_modules", None) or [])]
    unit = max((sum(p.numel() for p in m.parameters()) for m in units), default=sum(params.values()))
    get = lambda *keys: next((int(getattr(config, k)) for k in keys if getattr(config, k, None)), 0)  # noqa: E731
    hidden = get("hidden_size", "n_embd", "d_model")
    return ModelShape(name=name, params=sum(params.values()), trained=sum(p.numel() for p in trained.values()),
                      largest_trained=max((p.numel() for p in trained.values()), default=0), unit=unit,
                      hidden=hidden, ffn=get("ffn_dim", "intermediate_size", "n_inner") or 4 * hidden,
                      layers=get("num_hidden_layers", "n_layer"), heads=get("num_attention_heads", "n_head"),
                      vocab=get("vocab_size"), source=source)


# -- the arithmetic ------------------------------------------------------------------------------------
def plan(job: JobShape, gpu_memory: int, gpus: int | None = None) -> Plan:
    """The plan of `job` on GPUs of `gpu_memory` bytes: on `gpus` of them if given, else on the fewest that
    hold it (a CPU run: one host)."""
    runtime = process_resident() if job.device == "cpu" else RUNTIME_GPU
    if job.device == "cpu":
        result = Plan(job, None, gpu_memory, note="a CPU run: per_gpu is the process's memory on the host")
        result.per_gpu = _per_device(job, 1, runtime)
    else:
        fixed = gpus is not None
        count = gpus if fixed else _fewest(job, gpu_memory)
        result = Plan(job, count, gpu_memory)
        result.per_gpu = _per_device(job, count or 1, runtime)
        if count is None:
            result.note = (f"does not fit on GPUs of {human(gpu_memory)} with parallel={job.parallel}: its weights "
                           f"are on every GPU; shard them (parallel.zo=shard, parallel.fo=fsdp)")
        elif fixed and result.per_gpu["total"] > gpu_memory:
            result.note = f"{human(result.per_gpu['total'])} per GPU: more than the {human(gpu_memory)} a GPU has"
    result.host = _host(job, result.per_gpu, result.gpus or 1)
    result.disk = _disk(job)
    return result


SHARDED = ("shard", "fsdp", "device_map")  # the weights (and what goes with them) spread over the GPUs


def _fewest(job: JobShape, gpu_memory: int) -> int | None:
    if job.parallel not in SHARDED:
        return 1 if _per_device(job, 1, RUNTIME_GPU)["total"] <= gpu_memory else None
    for count in range(1, MAX_GPUS + 1):
        if _per_device(job, count, RUNTIME_GPU)["total"] <= gpu_memory:
            return count
    return None


def _per_device(job: JobShape, world: int, runtime: int) -> dict[str, int]:
    """Bytes on one GPU (or the host for a CPU run) of a job on `world` GPUs, by part."""
    model, method, e = job.model, job.method, job.weights_bytes
    master = method.kind == "torch" and e < 4 and job.master_weights
    trained_bytes = 4 if master else e  # the trained parameters' dtype
    parts = {"weights": model.params * e,
             "master_copy": model.trained * 4 if master else 0,  # fp32 masters (4 - e more) + autocast's copies (e)
             "gradients": 0, "optimizer_state": 0, "activations": 0, "z_block": 0}
    if method.kind == "torch":
        parts["gradients"] = model.trained * trained_bytes
        parts["optimizer_state"] = method.states * model.trained * trained_bytes
    elif method.kind in ("inplace", "addax"):
        parts["gradients"] = model.largest_trained * (e + job.update_bytes)  # one tensor's gradient, its fp32 math
        if method.kind == "addax" and job.parallel == "shard" and world > 1:  # all of them, sharded (below)
            parts["gradients"] = model.trained * e
    if method.kind == "zo":
        parts["optimizer_state"] = method.states * model.trained * job.state_bytes
    if method.kind in ("zo", "addax"):
        from .optim.engine import BLOCK, CUDA_BLOCK  # the engine's own block sizes (z's scratch per thread)

        block = CUDA_BLOCK if job.device == "cuda" else BLOCK
        parts["z_block"] = block * (e + 4 + 4 * method.states) * (job.threads if job.device == "cpu" else 1)
    rows = job.train_rows
    if job.parallel in ("data", "fsdp", "ddp"):  # the batch split over ranks
        rows = math.ceil(rows / world)
    rows = math.ceil(rows / job.micro_batches)  # each rank's share in micro-batches
    backward = method.kind in ("torch", "inplace", "addax")
    autocast_e = min(e, 2) if master else e
    parts["activations"] = max(_backward_activations(job, rows, autocast_e) if backward else 0,
                               _inference_activations(job, rows if method.kind != "evaluation" else 0, e),
                               _inference_activations(job, job.eval_rows, e, evaluation=True))
    if job.parallel in SHARDED and world > 1:
        for key in ("weights", "master_copy", "gradients", "optimizer_state"):
            parts[key] = math.ceil(parts[key] / world)
        if job.parallel != "device_map":  # FSDP gathers a unit in full for its forward (and the next, prefetched)
            parts["weights"] += 2 * model.unit * e
        if method.kind == "addax" and job.parallel == "shard":  # a unit's gradients, and their fp32 reduce-scatter
            parts["gradients"] += model.unit * (e + 4)
    elif job.parallel == "ddp" and world > 1:
        parts["gradients"] *= 2  # DDP's communication buckets copy the gradients
    parts["runtime"] = runtime
    parts["total"] = sum(parts.values())
    return parts


def _inference_activations(job: JobShape, rows: int, e: int, evaluation: bool = False) -> int:
    model, s = job.model, job.max_length
    loss = 2 * 4 if job.loss_fp32 else 2 * e
    kv_cache = 2 * model.layers * rows * s * model.hidden * e if evaluation and job.generation else 0
    return rows * s * (4 * model.hidden + 2 * model.ffn) * e + rows * OPTION_TOKENS * model.vocab * (e + loss) + kv_cache


def _backward_activations(job: JobShape, rows: int, e: int) -> int:
    model, s = job.model, job.max_length
    return (rows * s * model.layers * (10 * model.hidden + 2 * model.ffn) * e
            + rows * OPTION_TOKENS * model.vocab * (e + 12))


def checkpoint_bytes(job: JobShape) -> int:
    """One checkpoint on disk: the optimizer state (ZO: a few kB unless stateful) and, when saved, the trained
    weights in their dtype."""
    model, method, e = job.model, job.method, job.weights_bytes
    master = method.kind == "torch" and e < 4 and job.master_weights
    trained_bytes = 4 if master else e
    with_weights = job.checkpoint_weights or method.kind in ("torch", "inplace", "addax")
    state = method.states * model.trained * (job.state_bytes if method.kind == "zo" else trained_bytes)
    return 2 * SAFETENSORS_HEADER + state + (model.trained * trained_bytes if with_weights else 0)


def _host(job: JobShape, per_device: dict[str, int], world: int = 1) -> dict[str, int]:
    """Host memory of the run's process: the runtime, the tensors of a checkpoint copied to the host at once
    while it is written (checkpoint.py), likewise the trained weights while the best-on-dev copy is written
    (train.keep_best=disk) or all along (keep_best=host), and on GPU the weights as they load (a pretrained
    file's tensors pass through host memory; sharded over `world` ranks at load, one tensor's rows at a time)."""
    trains = job.method.kind != "evaluation"
    staged = checkpoint_bytes(job) if trains else 0
    best_bytes = job.model.trained * job.weights_bytes if trains else 0
    best_staged = best_bytes if job.keep_best == "disk" else 0
    best_held = best_bytes if job.keep_best == "host" else 0
    if job.device == "cpu":  # the device is the host: the step's peak, or a copy being written beside the state
        between_steps = per_device["total"] - per_device["activations"] - per_device["gradients"]
        peak = max(per_device["total"], between_steps + staged, between_steps + best_staged) + best_held
        return {"peak": peak, "checkpoint_copy": staged, "best_copy": best_staged or best_held}
    loading = job.model.params * job.weights_bytes
    if job.parallel in ("shard", "fsdp") and world > 1 and job.pretrained and job.peft == "none":
        loading = math.ceil(job.model.largest_trained / world) * job.weights_bytes  # every tensor trained: the largest
    return {"peak": process_resident() + max(loading, staged, best_staged) + best_held, "checkpoint_copy": staged,
            "best_copy": best_staged or best_held, "loading": loading}


def _disk(job: JobShape) -> dict[str, int]:
    """Disk of one run: records (trajectory.jsonl, log.jsonl), a checkpoint (two while one is swapped in), the
    best-on-dev copy (train.keep_best=disk) and the saved model (save_model). A completed run keeps its records
    and model/ only: its checkpoint and best copy are deleted when it ends."""
    model, method = job.model, job.method
    trains = method.kind != "evaluation"
    losses = 2 * method.directions if method.kind in ("zo", "addax") else 1
    records = job.steps * (TRAJECTORY_LINE + LOSS_VALUE * (losses + 2 * method.directions)) if trains else 0
    records += math.ceil(job.steps / max(job.log_interval, 1)) * LOG_LINE if trains else LOG_LINE
    checkpoint = checkpoint_bytes(job) if trains else 0
    best = model.trained * job.weights_bytes + SAFETENSORS_HEADER if trains and job.keep_best == "disk" else 0
    saved = (model.trained if job.peft != "none" else model.params) * job.weights_bytes if job.save_model else 0
    return {"records": records, "checkpoint": checkpoint, "best_copy": best, "saved_model": saved,
            "run_peak": records + 2 * checkpoint + best + saved, "run_end": records + saved}


def process_resident() -> int:
    """Resident bytes of this process (torch and transformers imported, as in a run), 0 where unknown."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- text ------------------------------------------------------------------------------------------------
def render(result: Plan) -> str:
    """The plan as the terminal shows it."""
    job, parts = result.job, result.per_gpu
    where = "host (CPU run)" if job.device == "cpu" else "per GPU"
    lines = [f"{job.model.name} ({count(job.model.params)} parameters, {count(job.model.trained)} trained"
             f"; config: {job.model.source}) x {job.method.name} ({job.method.kind}), "
             f"{8 * job.weights_bytes}-bit weights, batch {job.train_rows} sequences x {job.max_length} tokens, "
             f"parallel={job.parallel}, on {'CPU' if job.device == 'cpu' else 'CUDA (device=cpu plans a CPU run)'}"]
    if job.device != "cpu":
        lines.append(f"  GPUs of {human(result.gpu_memory)}: "
                     + (f"{result.gpus}" if result.gpus else "none holds it"))
    lines.append(f"  memory {where}:")
    for key, value in parts.items():
        if value or key == "total":
            lines.append(f"    {key.replace('_', ' '):<16} {human(value):>10}")
    lines.append(f"  host memory: {human(result.host['peak'])} at its peak")
    disk = result.disk
    held = ", ".join(f"{what} {human(disk[key])}" for key, what in
                     (("records", "records"), ("best_copy", "best-on-dev copy"), ("saved_model", "saved model"))
                     if disk[key])
    lines.append(f"  disk: {human(disk['checkpoint'])} per checkpoint (two while one is swapped in), "
                 f"{human(disk['run_peak'])} per run at its peak ({held}), {human(disk['run_end'])} once completed")
    if result.note:
        lines.append(f"  note: {result.note}")
    return "\n".join(lines)
