"""What a run is built from its config: the method, the model and tokenizer, the encoded splits.

One place for the runner, zobench-replay, zobench-lengths and the benchmarks, so each builds them as a run does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .data import sample_task
from .encoding import EncodedExample, Encoder
from .errors import ZobenchError
from .evaluate import MAX_NEW_TOKENS, evaluate
from .icl import demonstration_blocks
from .models import bos_override, load_model, resolve_device, resolve_dtype
from .optim import build_optimizer, optimizer_class
from .peft_adapters import apply_peft
from .precision import Precision
from .precision import from_config as precision_from_config
from .tasks import PromptTemplate

log = logging.getLogger(__name__)


def check_method(cfg: DictConfig, task: dict[str, Any]) -> type:
    """The method's class; refuses, before anything is loaded, what it cannot do in this run."""
    method = optimizer_class(cfg.optimizer.get("_target_"))  # zobench's own classes only, else one line
    k = OmegaConf.select(cfg, "icl.k", default=0)
    if not isinstance(k, int) or k < 0:
        raise ZobenchError(f"icl.k must be an integer >= 0, got {k!r}")
    method.check_run(cfg.optimizer.get("name"), task, k, OmegaConf.select(cfg, "peft.name", default="none"))
    return method


def sample_splits(task: dict[str, Any], cfg: DictConfig):
    """The run's train/dev/test examples (zobench/data.py), drawn from the task's pools by data.seed."""
    splits = sample_task(task, cfg.data)
    log.info("data: %d train / %d dev / %d test from %s", len(splits.train), len(splits.dev), len(splits.test),
             splits.source)
    return splits


def device_and_dtype(cfg: DictConfig) -> tuple[torch.device, torch.dtype]:
    device = resolve_device(str(cfg.device))
    return device, resolve_dtype(str(cfg.dtype), device)


def build_model(cfg: DictConfig, device: torch.device, dtype: torch.dtype, max_length: int | None = None):
    """(model, tokenizer, saveable): the model with the run's adapter, initialised from the run's seed
    (peft=none: the model itself); `saveable` is what save_pretrained writes (the adapter alone, with PEFT)."""
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    source = "random weights" if spec.get("init") == "random" else spec.get("path") or spec.get("hub_id")
    log.info("loading model %s (%s, %s on %s)", spec["name"], source, str(dtype).removeprefix("torch."), device)
    start = time.monotonic()  # a 13B model takes minutes to load: the log says what the silence is
    model, tokenizer = load_model(spec, device, dtype, max_length=max_length)
    peft_spec = OmegaConf.to_container(cfg.peft, resolve=True) if "peft" in cfg else None
    model, saveable = apply_peft(model, peft_spec, seed=int(cfg.seed))
    log.info("model %s loaded in %.1f s", spec["name"], time.monotonic() - start)
    return model, tokenizer, saveable


def precision_of(cfg: DictConfig, dtype: torch.dtype) -> Precision:
    return precision_from_config(cfg.get("precision"), dtype)


def build_method(cfg: DictConfig, model, loss_fn, precision: Precision):
    """The run's optimizer (or evaluation-only method) over `model`, seeded and scheduled as the run is."""
    return build_optimizer(cfg.optimizer, model, loss_fn, seed=int(cfg.seed), total_steps=int(cfg.train.steps),
                           precision=precision)


def encoder(cfg: DictConfig, tokenizer) -> Encoder:
    return Encoder(tokenizer, int(cfg.max_length), bos_override(OmegaConf.to_container(cfg.model, resolve=True)))


def answer_room(task: dict[str, Any]) -> int:
    """Tokens kept free after a generation prompt for its answer."""
    return MAX_NEW_TOKENS if task["kind"] == "generation" else 0


@dataclass
class EncodedSplits:
    train: list[EncodedExample]
    dev: list[EncodedExample]
    test: list[EncodedExample]
    truncated: dict[str, int] = field(default_factory=dict)  # examples cut from the left, per split
    icl_pool: int | None = None  # how many examples the demonstrations were drawn from (icl.k > 0)

    def record(self) -> dict[str, Any]:
        """metrics.json's fields (icl_pool only with demonstrations)."""
        return {"truncated": self.truncated, **({"icl_pool": self.icl_pool} if self.icl_pool is not None else {})}


def encode_splits(cfg: DictConfig, task: dict[str, Any], splits, tokenizer) -> EncodedSplits:
    """The rendered and tokenized train/dev/test examples, dev and test with their demonstrations."""
    template, encode, room = PromptTemplate(task), encoder(cfg, tokenizer), answer_room(task)
    rendered = {name: [template.render(row) for row in getattr(splits, name)] for name in ("train", "dev", "test")}
    contexts, pool = _demonstrations(cfg, rendered, splits.train_pool, template)
    encoded = {name: [encode.encode(example, room, context) for example, context in zip(examples, contexts[name])]
               for name, examples in rendered.items()}
    truncated = {name: sum(e.truncated for e in rows) for name, rows in encoded.items()}
    if any(truncated.values()):
        log.warning("truncated from the left to max_length=%s: %s", cfg.max_length, truncated)
    return EncodedSplits(**encoded, truncated=truncated, icl_pool=pool)


def _demonstrations(cfg, rendered, pool, template) -> tuple[dict[str, list[str]], int | None]:
    """ICL (icl.k > 0): each dev and test prompt's own k demonstrations drawn from the whole train split,
    MeZO's pool (zobench/icl.py); test takes the first draws, so its demonstrations do not depend on the
    dev size. Training examples never get any (MeZO). Also returns the pool's size (None without ICL)."""
    k = int(OmegaConf.select(cfg, "icl.k", default=0))
    n_test, n_dev = len(rendered["test"]), len(rendered["dev"])
    if not k:
        blocks, size = [""] * (n_test + n_dev), None
    else:
        blocks, size = demonstration_blocks(pool, n_test + n_dev, k, int(cfg.data.seed), template.render), len(pool)
        if k > len(pool):
            log.warning("icl.k=%d but the train split holds %d examples: each prompt gets all of them", k, len(pool))
    return {"train": [""] * len(rendered["train"]), "test": blocks[:n_test], "dev": blocks[n_test:]}, size


class Evaluator:
    """Scores examples on the run's task with the model as it stands (zobench/evaluate.py)."""

    def __init__(self, objective, task: dict[str, Any], tokenizer, cfg: DictConfig, device: torch.device):
        self.objective, self.task, self.tokenizer, self.device = objective, task, tokenizer, device
        self.classification = bool(task["train_as_classification"])
        self.batch_size, self.score = int(cfg.eval.batch_size), str(cfg.eval.score)

    def __call__(self, examples):
        return evaluate(self.objective, examples, kind=self.task["kind"], metric=self.task["metric"],
                        tokenizer=self.tokenizer, classification=self.classification,
                        batch_size=self.batch_size, score=self.score, device=self.device)
