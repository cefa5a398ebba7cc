"""The run record, the best on dev and the methods' kinds: the objects run.py is a recipe over (issue 19)."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from omegaconf import OmegaConf

from zobench.spec import RunSpec
from zobench.best_weights import BestOnDev
from zobench.errors import Diverged, ZobenchError
from zobench.optim import REGISTERED, optimizer_class
from zobench.optim.base import EVALUATION_ONLY, KINDS, ZEROTH_ORDER
from zobench.run_dir import RunDir
from zobench.run_record import RunRecord


@pytest.fixture
def opened(quick_cfg, tmp_path):
    """(cfg, the claimed run directory, a new RunRecord in it)."""
    cfg = quick_cfg()
    directory = RunDir(tmp_path / "run").claim()
    directory.start(OmegaConf.to_yaml(cfg, resolve=True), [])
    yield cfg, directory, RunRecord(RunSpec.from_cfg(cfg), directory)
    directory.release()


def _metrics(directory) -> dict:
    return json.loads((directory.path / "metrics.json").read_text())


def _evaluation(record, seconds: float, passes: int):
    def evaluate(examples):
        time.sleep(seconds)
        record.counter.forward_passes += passes
        record.counter.tokens += 10 * passes
        return {"metric": 0.5, "loss": 0.7, "accuracy": 0.5}
    return evaluate


def test_evaluations_stop_the_training_clock_and_count_as_evaluation(opened):
    _, directory, record = opened
    with record.training():
        record.counter.forward_passes, record.counter.tokens = 3, 30  # the step's passes
        assert record.log_train(1, 0.5, 0.1, line=True) == 0.5
        record.log_eval("dev", 1, _evaluation(record, 0.4, passes=2), ["an example"])
    record.finish()
    metrics = _metrics(directory)
    assert (metrics["forward_passes"], metrics["eval_forward_passes"], metrics["tokens"]) == (3, 2, 30)
    assert metrics["train_wall_clock_s"] < 0.4 <= metrics["wall_clock_s"]
    lines = [json.loads(line) for line in (directory.path / "log.jsonl").read_text().splitlines()]
    assert [(line["event"], line["step"]) for line in lines] == [("train", 1), ("eval", 1)]
    assert lines[1]["accuracy"] == 0.5 and lines[1]["forward_passes"] == 3


def test_a_resumed_record_goes_on_from_its_state(opened):
    cfg, directory, record = opened
    with record.training():
        record.counter.forward_passes = 4
        record.log_train(1, 0.5, 0.1, line=False)  # a loss kept for the next train line
        state = record.state_dict()
    resumed = RunRecord(RunSpec.from_cfg(cfg), directory, json.loads(json.dumps(state)), step=1)  # as a checkpoint keeps it
    assert resumed.metrics["resumed_at_step"] == 1 and resumed.metrics["status"] == "running"
    assert resumed.recent_losses == [0.5] and resumed.counter.forward_passes == 4
    assert _metrics(directory)["resumed_at_step"] == 1  # written as it opens
    with resumed.training():
        resumed.counter.forward_passes = 6
        assert resumed.log_train(2, 1.5, 0.1, line=True) == 1.0  # the mean of both steps' losses
    assert resumed.metrics["forward_passes"] == 6
    assert resumed.metrics["train_wall_clock_s"] >= state["seconds"]["train"]


def test_a_loss_that_is_not_finite_diverges_at_its_step(opened):
    _, _, record = opened
    with pytest.raises(Diverged, match="nan"):
        record.log_train(3, math.nan, 0.1, line=True)
    assert record.metrics["steps"] == 3


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))


def _set(model, value: float):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


@pytest.mark.parametrize("mode", ["disk", "host"])
def test_the_best_on_dev_keeps_the_lowest_loss_and_brings_its_weights_back(opened, mode):
    _, directory, record = opened
    model = _model()
    best = BestOnDev(model, mode, directory, record)
    for step, value, loss in [(2, 1.0, 1.0), (4, 2.0, 1.2), (6, 3.0, 1.1)]:
        _set(model, value)
        record.note(steps=step)
        assert best.offer({"metric": 0.5, "loss": loss}, step) == (step == 2)
    assert (_metrics(directory)["best_step"], _metrics(directory)["dev_loss"]) == (2, 1.0)  # noted as offered
    assert best.state_dict()["best_score"] == 1.0
    best.restore()
    assert all(torch.all(p == 1.0) for p in model.parameters())


def test_keep_best_none_takes_every_evaluation_the_test_follows(opened):
    _, directory, record = opened
    best = BestOnDev(_model(), "none", directory, record)
    assert best.offer({"metric": 0.5, "loss": 1.0}, 2) and best.offer({"metric": 0.4, "loss": 2.0}, 4)
    assert (record.metrics["best_step"], record.metrics["dev_loss"]) == (4, 2.0)
    assert best.state_dict()["best_weights"] is None


def test_best_weights_changed_on_disk_are_refused(opened):
    _, directory, record = opened
    model = _model()
    best = BestOnDev(model, "disk", directory, record)
    best.offer({"metric": 0.5, "loss": 1.0}, 2)
    assert best.state_dict()["best_weights"]["sha256"]
    path = directory.path / "best_weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ZobenchError, match="SHA-256"):
        best.restore()


def test_every_method_declares_its_kind():
    classes = {target: optimizer_class(target) for target in REGISTERED}
    assert {cls.kind for cls in classes.values()} == set(KINDS)
    assert {target.rsplit(".", 1)[1] for target, cls in classes.items() if cls.kind == EVALUATION_ONLY} == \
        {"ZeroShot", "LinearProbe"}
    for cls in classes.values():
        assert not hasattr(cls, "trains") and not hasattr(cls, "zeroth_order")  # the kind says it
        if cls.kind != EVALUATION_ONLY:
            assert cls.replayable.fget(cls) == (cls.kind == ZEROTH_ORDER)


def test_zobench_lengths_encodes_the_training_split_as_the_runner_does(quick_cfg):
    from zobench.build import encode_splits, sample_splits
    from zobench.lengths import length_report
    from zobench.models import load_tokenizer

    cfg = quick_cfg("task=squad", "data.n_train=6", "max_length=64")  # generation: room for the answer
    spec = RunSpec.from_cfg(cfg)
    encoded = encode_splits(spec, sample_splits(spec), load_tokenizer(dict(spec.model)))
    assert length_report(cfg).lengths == [max(map(len, e.sequences)) for e in encoded.train]
