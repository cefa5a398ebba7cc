"""What a run is built from its spec (zobench/spec.py): the method, the model and tokenizer, the encoded splits.

One place for the runner, zobench-replay, zobench-lengths and the benchmarks, so each builds them as a run does.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import sample_task
from .encoding import EncodedExample, Encoder
from .evaluate import MAX_NEW_TOKENS, evaluate
from .icl import demonstration_blocks
from .models import bos_override, load_model
from .optim import build_optimizer
from .parallel.sharded_load import adapters_drawn_on_host
from .peft_adapters import apply_peft
from .spec import RunSpec
from .tasks import PromptTemplate

log = logging.getLogger(__name__)


def sample_splits(spec: RunSpec):
    """The run's train/dev/test examples (zobench/data.py), drawn from the task's pools by data.seed."""
    splits = sample_task(spec.task, spec.data)
    log.info("data: %d train / %d dev / %d test from %s", len(splits.train), len(splits.dev), len(splits.test),
             splits.source)
    return splits


def build_model(spec: RunSpec, max_length: int | None = None, empty: bool = False):
    """(model, tokenizer, saveable): the model with the run's adapter, initialised from the run's seed
    (peft=none: the model itself); `saveable` is what save_pretrained writes (the adapter alone, with PEFT).
    `empty`: a pretrained model's parameters stay on the meta device, for the ranks to shard and fill."""
    model_spec = dict(spec.model)
    source = "random weights" if model_spec["init"] == "random" else model_spec.get("path") or model_spec.get("hub_id")
    log.info("loading model %s (%s, %s on %s)", model_spec["name"], source, str(spec.dtype).removeprefix("torch."),
             spec.device)
    start = time.monotonic()  # a 13B model takes minutes to load: the log says what the silence is
    model, tokenizer = load_model(model_spec, spec.device, spec.dtype, max_length=max_length, empty=empty)
    with adapters_drawn_on_host(model) if empty else nullcontext():  # a skeleton's adapter keeps its drawn init
        model, saveable = apply_peft(model, dict(spec.peft), seed=spec.seed)
    log.info("model %s loaded in %.1f s", model_spec["name"], time.monotonic() - start)
    return model, tokenizer, saveable


def build_method(spec: RunSpec, model, loss_fn):
    """The run's optimizer (or evaluation-only method) over `model`, seeded and scheduled as the run is."""
    return build_optimizer(spec.method, model, loss_fn, seed=spec.seed, total_steps=spec.train.steps,
                           precision=spec.precision)


def encoder(spec: RunSpec, tokenizer) -> Encoder:
    return Encoder(tokenizer, spec.max_length, bos_override(dict(spec.model)))


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


def encode_splits(spec: RunSpec, splits, tokenizer) -> EncodedSplits:
    """The rendered and tokenized train/dev/test examples, dev and test with their demonstrations."""
    template, encode, room = PromptTemplate(spec.task), encoder(spec, tokenizer), answer_room(spec.task)
    rendered = {name: [template.render(row) for row in getattr(splits, name)] for name in ("train", "dev", "test")}
    contexts, pool = _demonstrations(spec, rendered, splits.train_pool, template)
    encoded = {name: [encode.encode(example, room, context) for example, context in zip(examples, contexts[name])]
               for name, examples in rendered.items()}
    truncated = {name: sum(e.truncated for e in rows) for name, rows in encoded.items()}
    if any(truncated.values()):
        log.warning("truncated from the left to max_length=%s: %s", spec.max_length, truncated)
    return EncodedSplits(**encoded, truncated=truncated, icl_pool=pool)


def _demonstrations(spec: RunSpec, rendered, pool, template) -> tuple[dict[str, list[str]], int | None]:
    """ICL (icl.k > 0): each dev and test prompt's own k demonstrations drawn from the whole train split,
    MeZO's pool (zobench/icl.py); test takes the first draws, so its demonstrations do not depend on the
    dev size. Training examples never get any (MeZO). Also returns the pool's size (None without ICL)."""
    k = spec.icl_k
    n_test, n_dev = len(rendered["test"]), len(rendered["dev"])
    if not k:
        blocks, size = [""] * (n_test + n_dev), None
    else:
        blocks, size = demonstration_blocks(pool, n_test + n_dev, k, spec.data.seed, template.render), len(pool)
        if k > len(pool):
            log.warning("icl.k=%d but the train split holds %d examples: each prompt gets all of them", k, len(pool))
    return {"train": [""] * len(rendered["train"]), "test": blocks[:n_test], "dev": blocks[n_test:]}, size


class Evaluator:
    """Scores examples on the run's task with the model as it stands (zobench/evaluate.py)."""

    def __init__(self, objective, spec: RunSpec, tokenizer, device: torch.device):
        self.objective, self.task, self.tokenizer, self.device = objective, spec.task, tokenizer, device
        self.classification = self.task["train_as_classification"]
        self.batch_size, self.score = spec.eval.batch_size, spec.eval.score

    def __call__(self, examples):
        return evaluate(self.objective, examples, kind=self.task["kind"], metric=self.task["metric"],
                        tokenizer=self.tokenizer, classification=self.classification,
                        batch_size=self.batch_size, score=self.score, device=self.device)
