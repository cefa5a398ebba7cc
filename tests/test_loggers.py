"""Trackers (logger=tensorboard|mlflow|wandb): each writes a run its own reader opens, offline."""

from __future__ import annotations

import json
import sys

import pytest

from zobench.errors import ZobenchError
from zobench.loggers import scalars
from zobench.run_record import JsonlLog
from zobench.run import run

TRAIN = ["optimizer=mezo", "train.steps=2", "train.log_interval=1"]


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_tensorboard_event_files_hold_the_log(quick_cfg, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = run(quick_cfg(*TRAIN, "logger=tensorboard"), tmp_path)
    assert metrics["status"] == "completed"
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "dev/metric", "test/metric", "test/accuracy"} <= tags
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    expected = [(line["step"], line["loss"]) for line in _log(tmp_path) if line["event"] == "train"]
    assert [s for s, _ in losses] == [s for s, _ in expected] == [1, 2]
    assert [v for _, v in losses] == pytest.approx([v for _, v in expected])
    assert events.Scalars("test/metric")[0].value == pytest.approx(metrics["test_metric"])


def test_mlflow_store_in_the_run_dir_holds_params_log_and_final_metrics(quick_cfg, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    metrics = run(quick_cfg(*TRAIN, "logger=mlflow"), tmp_path)
    assert metrics["status"] == "completed"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("zobench")
    [tracked] = client.search_runs([experiment.experiment_id])
    assert tracked.info.status == "FINISHED" and tracked.data.tags["zobench.status"] == "completed"
    assert tracked.data.params["optimizer.name"] == "mezo" and tracked.data.params["task.name"] == "sst2"
    assert tracked.data.metrics["final/test_metric"] == pytest.approx(metrics["test_metric"])
    assert tracked.data.metrics["final/forward_passes"] == metrics["forward_passes"]
    history = client.get_metric_history(tracked.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2]


def test_wandb_offline_run_is_written_in_the_run_dir(quick_cfg, tmp_path):
    pytest.importorskip("wandb")
    metrics = run(quick_cfg("optimizer=zero_shot", "logger=wandb"), tmp_path)
    assert metrics["status"] == "completed"
    [record_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    data = record_file.read_bytes()  # wandb's record log: its reader is `wandb sync`, which needs the network
    assert b"test/metric" in data and b"final/test_metric" in data and b"zero_shot" in data


def test_missing_tracker_package_is_one_line_and_recorded(quick_cfg, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    with pytest.raises(ZobenchError, match=r"logger=mlflow needs the mlflow package: pip install 'zobench\[mlflow\]'"):
        run(quick_cfg("logger=mlflow"), tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


class _Recorder:
    def __init__(self, fail=False):
        self.records, self.final, self.fail = [], None, fail

    def record(self, record):
        if self.fail:
            raise RuntimeError("tracker down")
        self.records.append(record)

    def finish(self, metrics):
        self.final = metrics


def test_sinks_get_every_line_a_resumed_run_keeps_and_a_failing_one_is_dropped(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps({"event": "train", "step": 1, "loss": 0.5}) + "\n")  # kept by a resumed run
    log = JsonlLog(path)
    good, bad = _Recorder(), _Recorder(fail=True)
    log.attach([good, bad])
    log.write({"event": "eval", "split": "dev", "step": 2, "metric": 0.75, "loss": 0.4})
    log.finish({"status": "completed"})
    log.close()
    assert [r["step"] for r in good.records] == [1, 2] and good.final == {"status": "completed"}
    assert len(path.read_text().splitlines()) == 2  # log.jsonl itself is untouched by the failure
    assert scalars(good.records[1]) == (2, {"dev/metric": 0.75, "dev/loss": 0.4})
