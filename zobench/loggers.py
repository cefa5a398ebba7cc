"""Experiment trackers, `logger=tensorboard|mlflow|wandb` (conf/logger/; off by default).

A tracker is a sink of the run's log: it gets the resolved config once as parameters, then every record
written to log.jsonl (run_record.JsonlLog forwards them: one logging path), then the final metrics.json.
Each works without a network: TensorBoard event files and an MLflow file store under the run directory,
wandb in offline mode (`wandb sync` uploads later).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .errors import ZobenchError

log = logging.getLogger(__name__)

TRACKERS = ("none", "tensorboard", "mlflow", "wandb")
# What each tracker needs installed: the extra of the same name (pyproject.toml).
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


class Sink:
    """What a tracker implements (zobench/run_record.py JsonlLog calls it)."""

    def record(self, record: dict[str, Any]) -> None:
        """One log.jsonl line."""

    def finish(self, metrics: dict[str, Any]) -> None:
        """The run's metrics.json; the tracker's run ends."""


def open_trackers(spec, run_dir: Path, resumed: bool = False) -> list[Sink]:
    """The trackers of `spec.logger` (zobench/spec.RunSpec), each sent the run's whole resolved config."""
    settings = dict(spec.logger)
    name = settings.get("name")
    if name == "none":
        return []
    if name not in TRACKERS:
        raise ZobenchError(f"unknown logger '{name}'; valid: {', '.join(TRACKERS)}")
    try:
        __import__(PACKAGES[name])
    except ImportError as error:
        raise ZobenchError(f"logger={name} needs the {PACKAGES[name]} package: "
                           f"pip install 'zobench[{name}]'") from error
    sink = {"tensorboard": TensorBoardSink, "mlflow": MlflowSink, "wandb": WandbSink}[name]
    return [sink(settings, Path(run_dir), dict(spec.config), resumed)]


# -- what every tracker logs, named the same way ------------------------------------------------------
def scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {"train/loss": …} or {"dev/metric": …, "test/accuracy": …}) from one log.jsonl record."""
    group = record.get("split") if record.get("event") == "eval" else record.get("event", "train")
    values = {f"{group}/{key}": float(value) for key, value in record.items()
              if key not in ("step", "event", "split") and _number(value)}
    return int(record.get("step", 0)), values


def final_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {f"final/{key}": float(value) for key, value in metrics.items() if _number(value)}


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The resolved config as dotted keys with string values (what trackers take as parameters)."""
    params = {}
    for key, value in config.items():
        if isinstance(value, dict):
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = str(value)
    return params


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- the trackers ----------------------------------------------------------------------------------------
class TensorBoardSink(Sink):
    """Event files in <run dir>/<logger.dir>; the config as text and hparams."""

    def __init__(self, settings, run_dir: Path, config, resumed: bool):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run replays its kept records: purge_step=0 hides what the stopped process had written.
        self.writer = SummaryWriter(str(run_dir / str(settings.get("dir", "tensorboard"))),
                                    purge_step=0 if resumed else None)
        self.params = flat_params(config)
        self.writer.add_text("config", "```\n" + OmegaConf.to_yaml(config) + "\n```")

    def record(self, record):
        step, values = scalars(record)
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def finish(self, metrics):
        self.writer.add_hparams(self.params, final_scalars(metrics), run_name=".")
        self.writer.close()


class MlflowSink(Sink):
    """A run in an MLflow tracking store: unless logger.tracking_uri names another, an SQLite file in the
    run directory, <run dir>/mlflow.db (MLflow 3 keeps its plain-folder store in maintenance mode only)."""

    STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}

    def __init__(self, settings, run_dir: Path, config, resumed: bool):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = settings.get("tracking_uri") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=self.uri)
        name = str(settings.get("experiment", "zobench"))
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            name, artifact_location=(run_dir / "mlartifacts").resolve().as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name,
                                             tags={"zobench.run_dir": str(run_dir)}).info.run_id
        params = [Param(key, value[:6000]) for key, value in flat_params(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start: start + 100])

    def record(self, record):
        from mlflow.entities import Metric

        step, values = scalars(record)
        now = _milliseconds()
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def finish(self, metrics):
        from mlflow.entities import Metric

        now = _milliseconds()
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in final_scalars(metrics).items()])
        self.client.set_tag(self.run_id, "zobench.status", str(metrics.get("status")))
        self.client.set_terminated(self.run_id, self.STATUS.get(metrics.get("status"), "FAILED"))


class WandbSink(Sink):
    """A wandb run, offline by default, in <run dir>/wandb."""

    def __init__(self, settings, run_dir: Path, config, resumed: bool):
        import wandb

        self.run = wandb.init(project=str(settings.get("project", "zobench")), entity=settings.get("entity"),
                              mode=str(settings.get("mode", "offline")), dir=str(run_dir), name=run_dir.name,
                              config=config, reinit="create_new",
                              settings=wandb.Settings(silent=True))  # zobench's own log says where the run is

    def record(self, record):
        step, values = scalars(record)
        self.run.log(values, step=step)

    def finish(self, metrics):
        import wandb

        self.run.summary.update({**final_scalars(metrics), "final/status": str(metrics.get("status"))})
        self.run.finish(exit_code=0 if metrics.get("status") == "completed" else 1)
        wandb.teardown()  # finish() may return before wandb's service has written the run file: wait for it


def _milliseconds() -> int:
    import time

    return int(time.time() * 1000)
