"""The run spec: the Hydra config read once, typed and checked, before any data or model is read.

`RunSpec.from_cfg(cfg)` is the one reader of a composed config (the runner's, and a received run folder's
config.yaml in zobench-replay): every key the code uses becomes a field of a frozen dataclass, and every bad
value is one line naming its key (the CLI exits 2). Defaults live in the YAML (conf/) only: a missing key is
refused, never filled in here. A method's own settings are read by optim/settings.py (each method's
`Settings` dataclass); the model, task, adapter and tracker sections stay mappings (their loaders take them
whole) and are checked here key by key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from .best_weights import MODES as KEEP_BEST
from .errors import ZobenchError
from .optim.settings import MethodSpec, check_rule, flag, is_number, read_method, whole_number
from .precision import Precision
from .precision import from_config as precision_from_config

SELECT_BY = ("loss", "metric")
SCORES = ("mean", "sum")
ZO_MODES = ("data", "directions", "shard")
FO_MODES = ("fsdp", "ddp")
FSDP_PARAM_DTYPES = ("float32", "weights")
# Keys added to conf/ after runs were recorded without them, and the value those runs behaved as: a received
# config.yaml (zobench-replay) is read with them; a run's own config always has them (its YAML sets them).
KEYS_ADDED = {"parallel.zo": "data", "parallel.fo": "fsdp", "parallel.fsdp_param_dtype": "float32",
              "precision.zo_generator": "device", "train.grad_accumulation": 1,
              "model.headroom_gib": 0}
_ABSENT = object()
SEED_MEANINGS = {"seed": "the optimizer seed: ZO directions and batch order",
                 "data.seed": "the data sampling seed: which rows are train, dev and test",
                 "model.init_seed": "the seed of a random init's weights"}


@dataclass(frozen=True)
class DataSpec:
    """MeZO's protocol: train+dev sampled from the train split, test from validation (zobench/data.py)."""
    n_train: int
    n_dev: int
    n_test: int
    seed: int


@dataclass(frozen=True)
class EarlyStopSpec:
    patience: int | None
    interval: int | None
    metric: str


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    epochs: int | None
    batch_size: int
    grad_accumulation: int  # micro-batches per step, their gradients added up before the step (first-order)
    log_interval: int
    eval_interval: int
    select_by: str
    keep_best: str
    early_stop: EarlyStopSpec

    def for_training_size(self, n_train: int) -> TrainSpec:
        """train.epochs resolved once the training set's size is known (HF Trainer's rule, which MeZO's FT and
        head-tuning rows ran through: finetune.sh `--num_train_epochs 5 --evaluation_strategy epoch`): an epoch
        is ceil(n_train / batch) steps, the last batch smaller, one dev evaluation per epoch. Without epochs:
        itself."""
        if self.epochs is None:
            return self
        per_epoch = max(math.ceil(n_train / self.batch_size), 1)
        return replace(self, steps=self.epochs * per_epoch, eval_interval=per_epoch)


@dataclass(frozen=True)
class EvalSpec:
    batch_size: int
    score: str  # mean (MeZO) | sum token log-prob of a candidate


@dataclass(frozen=True)
class CheckpointSpec:
    every: int
    weights: bool


@dataclass(frozen=True)
class ParallelSpec:
    zo: str  # data | directions | shard (README "More than one GPU")
    fo: str  # fsdp | ddp
    fsdp_param_dtype: str  # float32 | weights: what FSDP2 gathers in the 16-bit regime (parallel/first_order.py)


@dataclass(frozen=True)
class RunSpec:
    seed: int
    device: torch.device
    dtype: torch.dtype
    max_length: int
    save_model: bool
    icl_k: int
    data: DataSpec
    train: TrainSpec
    eval: EvalSpec
    checkpoint: CheckpointSpec
    precision: Precision
    parallel: ParallelSpec
    method: MethodSpec
    model: Mapping[str, Any]
    task: Mapping[str, Any]
    peft: Mapping[str, Any]
    logger: Mapping[str, Any]
    config: Mapping[str, Any]  # the whole resolved config, as trackers record it
    config_yaml: str  # config.yaml's text: what a resume compares and replay reads back

    @property
    def peft_name(self) -> str:
        return self.peft["name"]

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> RunSpec:
        """The spec of a composed config; one ZobenchError naming the key for the first bad value."""
        plain = OmegaConf.to_container(cfg, resolve=True)
        c = _Reader(plain)
        device = _device(c.str("device"))
        dtype = _dtype(c.str("dtype"), device)
        data = DataSpec(n_train=c.int("data.n_train", 1), n_dev=c.int("data.n_dev", 0),
                        n_test=c.int("data.n_test", 0), seed=c.seed("data.seed"))
        task = _task(c)
        train = TrainSpec(
            steps=c.int("train.steps", 1), epochs=c.int("train.epochs", 1, optional=True,
                                                        wanted=">= 1, or null to train train.steps steps"),
            batch_size=c.int("train.batch_size", 1), grad_accumulation=c.int("train.grad_accumulation", 1),
            log_interval=c.int("train.log_interval", 1),
            eval_interval=c.int("train.eval_interval", 0, wanted=">= 0 (0: evaluate at the end only)"),
            select_by=c.choice("train.select_by", SELECT_BY), keep_best=c.choice("train.keep_best", KEEP_BEST),
            early_stop=_early_stop(c, data, task))
        max_length = c.int("max_length", 8)
        icl_k = c.int("icl.k", 0, wanted=">= 0 (0: no demonstrations)")
        method = read_method(c.mapping("optimizer"))
        peft = _peft(c)
        method.cls.check_run(method.name, task, icl_k, peft["name"])
        _check_accumulation(train, method)
        spec = cls(
            seed=c.seed("seed"), device=device, dtype=dtype, max_length=max_length,
            save_model=c.flag("save_model"), icl_k=icl_k, data=data, train=train,
            eval=EvalSpec(batch_size=c.int("eval.batch_size", 1), score=c.choice("eval.score", SCORES)),
            checkpoint=CheckpointSpec(every=c.int("checkpoint.every", 1), weights=c.flag("checkpoint.weights")),
            precision=_precision(c, dtype),
            parallel=ParallelSpec(zo=c.choice("parallel.zo", ZO_MODES), fo=c.choice("parallel.fo", FO_MODES),
                                  fsdp_param_dtype=c.choice("parallel.fsdp_param_dtype", FSDP_PARAM_DTYPES)),
            method=method, model=_model(c, max_length), task=MappingProxyType(task), peft=MappingProxyType(peft),
            logger=MappingProxyType(c.mapping("logger")), config=MappingProxyType(plain),
            config_yaml=OmegaConf.to_yaml(cfg, resolve=True))
        return spec

    @classmethod
    def from_received(cls, cfg: DictConfig, ran_in: Any = None) -> RunSpec:
        """The spec of a run folder's config.yaml (zobench-replay): keys added to zobench since the run was made
        take the value its runs behaved as (KEYS_ADDED); `dtype=auto` is the dtype the run recorded it ran in
        (`ran_in`, metrics.json's), not what auto means on this machine."""
        from .models import DTYPES

        cfg = cfg.copy()
        OmegaConf.set_struct(cfg, False)
        for key, value in KEYS_ADDED.items():
            if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
                OmegaConf.update(cfg, key, value, force_add=True)
        if cfg.get("dtype") == "auto" and ran_in in DTYPES:
            cfg.dtype = ran_in
        return cls.from_cfg(cfg)

    def for_training_size(self, n_train: int) -> RunSpec:
        """The spec with train.epochs resolved to steps (TrainSpec.for_training_size)."""
        return replace(self, train=self.train.for_training_size(n_train))


class _Reader:
    """Typed reads of a resolved config by dotted key, each refusal naming the key."""

    def __init__(self, plain: dict[str, Any]):
        self.plain = plain

    def has(self, dotted: str) -> bool:
        node = self.plain
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def get(self, dotted: str) -> Any:
        node = self.plain
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ZobenchError(f"{dotted} is missing from the config (conf/config.yaml and conf/*/ set every "
                                   f"key; a config.yaml written by another zobench version may lack it)")
            node = node[part]
        return node

    def int(self, dotted: str, least: int | None = None, optional: bool = False, wanted: str | None = None):
        value = self.get(dotted)
        if value is None and optional:
            return None
        number = whole_number(dotted, value)
        if least is not None:
            check_rule(dotted, number, (lambda v: v >= least, wanted or f">= {least}"))
        return number

    def seed(self, dotted: str) -> int:
        """numpy's RandomState (MeZO's sampling) and torch.manual_seed both take seeds in [0, 2**32)."""
        value = self.int(dotted)
        if not 0 <= value < 2**32:
            raise ZobenchError(f"{dotted} must be in [0, 2**32 - 1] ({SEED_MEANINGS[dotted]}), got {value}")
        return value

    def flag(self, dotted: str) -> bool:
        return flag(dotted, self.get(dotted))

    def str(self, dotted: str) -> str:
        value = self.get(dotted)
        if not isinstance(value, str):
            raise ZobenchError(f"{dotted} must be a string, got {value!r:.60}")
        return value

    def choice(self, dotted: str, choices: tuple[str, ...]) -> str:
        value = self.get(dotted)
        if value not in choices:
            raise ZobenchError(f"{dotted} must be {_either(choices)}, got {value!r:.60}")
        return value

    def mapping(self, dotted: str) -> dict[str, Any]:
        value = self.get(dotted)
        if not isinstance(value, dict):
            raise ZobenchError(f"{dotted} must be a mapping, got {value!r:.60}")
        return value


def _either(choices: tuple[str, ...]) -> str:
    return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"


def _device(name: str) -> torch.device:
    from .models import resolve_device

    return resolve_device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    from .models import resolve_dtype

    dtype = resolve_dtype(name, device)  # refuses unknown names
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ZobenchError(f"dtype={name}: {torch.cuda.get_device_name(device)} cannot run bfloat16; use float16")
    return dtype


def _precision(c: _Reader, dtype: torch.dtype) -> Precision:
    c.flag("precision.master_weights")
    grad_clip = c.get("precision.grad_clip")
    if grad_clip is not None and not (is_number(grad_clip) and grad_clip > 0):
        raise ZobenchError(f"precision.grad_clip must be a number > 0, or null (no clipping), got {grad_clip!r:.60}")
    return precision_from_config(c.mapping("precision"), dtype)  # each choice against its values


def _check_accumulation(train: TrainSpec, method: MethodSpec) -> None:
    """train.grad_accumulation > 1 for a method whose gradients add up over micro-batches, each of them not empty."""
    from .optim.base import FIRST_ORDER, ZEROTH_ORDER

    parts = train.grad_accumulation
    if parts == 1:
        return
    if not getattr(method.cls, "accumulates", False):  # zero_shot and lp are no Optimizer
        why = {FIRST_ORDER: "updates each parameter in place during backward: no gradient is kept to accumulate "
                            "(optimizer=sgd or adam accumulates)",
               # a sum of micro-batch losses would round otherwise than the whole batch's loss (MeZO's, in the
               # weights' dtype), and the forward passes keep no activations for micro-batches to save
               ZEROTH_ORDER: "is zeroth-order: there is no gradient to accumulate (its forward passes keep no "
                             "activations)"}.get(method.cls.kind, "takes no training step")
        raise ZobenchError(f"train.grad_accumulation={parts}: optimizer={method.name} {why}; set "
                           f"train.grad_accumulation=1")
    if parts > train.batch_size:
        raise ZobenchError(f"train.grad_accumulation={parts} splits each batch of train.batch_size="
                           f"{train.batch_size} examples into {parts} micro-batches: make it at most "
                           f"{train.batch_size}")


def _early_stop(c: _Reader, data: DataSpec, task: dict[str, Any]) -> EarlyStopSpec:
    from .early_stopping import EarlyStopping

    cap = task["sizes"].get("n_dev")
    stop = EarlyStopping.from_config(c.mapping("train.early_stop"), data.n_dev > 0 and (cap is None or cap > 0))
    return EarlyStopSpec(stop.patience, stop.interval, stop.metric)


def _task(c: _Reader) -> dict[str, Any]:
    """The task (tasks/<name>.yaml over TASK_DEFAULTS); its templates compile and fit their rendering budget
    on placeholder values."""
    from .tasks import KINDS, TASK_DEFAULTS, PromptTemplate

    task = {**TASK_DEFAULTS, **c.mapping("task")}
    for key in ("samples", "train_as_classification"):
        flag(f"task.{key}", task[key])
    if task["kind"] not in KINDS:
        raise ZobenchError(f"task.kind must be {_either(KINDS)}, got {task['kind']!r:.60}")
    if task["metric"] not in ("accuracy", "f1", "em"):
        raise ZobenchError(f"task.metric must be accuracy, f1 or em, got {task['metric']!r:.60}")
    if task["train_as_classification"] and task["kind"] == "generation":
        raise ZobenchError(f"task '{task.get('name')}' is a generation task: task.train_as_classification must be false")
    sizes = task["sizes"]
    if not isinstance(sizes, dict):
        raise ZobenchError(f"task.sizes must be a mapping of n_train/n_dev/n_test caps, got {sizes!r:.60}")
    for key, least in (("n_train", 1), ("n_dev", 0), ("n_test", 0)):
        if sizes.get(key) is not None:
            c.int(f"task.sizes.{key}", least)
    if "prompt" in task:
        PromptTemplate(task).check_budget()
    return task


def _peft(c: _Reader) -> dict[str, Any]:
    from .peft_adapters import METHODS, PREFIX_INITS

    peft = c.mapping("peft")
    name = peft.get("name")
    if name not in METHODS:
        raise ZobenchError(f"peft.name must be one of {', '.join(METHODS)}, got {name!r:.60}")
    for key in ("r", "alpha", "num_virtual_tokens"):
        if peft.get(key) is not None:
            c.int(f"peft.{key}", 1)
    if peft.get("dropout") is not None:
        check_rule("peft.dropout", peft["dropout"], (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"))
    modules = peft.get("target_modules")
    if modules is not None and not (isinstance(modules, list) and modules and all(isinstance(m, str) for m in modules)):
        raise ZobenchError(f"peft.target_modules must be a non-empty list of module names, got {modules!r:.60}")
    if name == "prefix" and peft.get("init") not in (None, *PREFIX_INITS):
        raise ZobenchError(f"peft.init must be one of {', '.join(PREFIX_INITS)}, got {peft['init']!r:.60}")
    return peft


def _model(c: _Reader, max_length: int) -> Mapping[str, Any]:
    """The model section, checked: a local model.path holds a model, and max_length fits the positions of a
    model whose config is at hand (a random init's `arch`, a local model.path's config.json; a hub model:
    zobench/models.py checks once its config is read)."""
    from .models import check_model_folder, check_positions, local_model_config

    model = c.mapping("model")
    init = c.choice("model.init", ("pretrained", "random"))
    c.seed("model.init_seed")
    if model.get("bos_token_id") is not None:
        c.int("model.bos_token_id", 0, wanted="a token id >= 0, or null")
    for key in ("vocab_size", "max_position_embeddings"):
        if c.has(f"model.arch.{key}") and model["arch"][key] is not None:
            c.int(f"model.arch.{key}", 1)
    check_rule("model.headroom_gib", c.get("model.headroom_gib"), (lambda v: is_number(v) and v >= 0, "a number of GiB >= 0"))
    if model.get("path"):
        check_model_folder(model)
    if init == "random":
        positions = model.get("arch", {}).get("max_position_embeddings") if isinstance(model.get("arch"), dict) else None
        check_positions(max_length, positions, f"model.arch.max_position_embeddings of model={model.get('name')}")
    elif model.get("path"):
        config, where = local_model_config(str(model["path"]))
        if config is not None:
            check_positions(max_length, config.get("max_position_embeddings"), f"max_position_embeddings in {where}")
    return MappingProxyType(model)
