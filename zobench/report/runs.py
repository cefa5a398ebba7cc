"""Reading run directories (metrics.json, config.yaml, log.jsonl) into pandas, and nothing else.

A run directory is any folder holding a metrics.json. Its resolved config.yaml is flattened into
columns named `cfg.<dotted key>` (e.g. `cfg.optimizer.lr`): those are the hyperparameters the
selection compares; every metrics.json field is a column of its own. A YAML null is kept as the
text "null"; a key the run's config does not have (an older zobench) is missing (NaN).

The `optimizer` column names the *method*, as the papers' rows do: the optimizer, with its adapter
when there is one (`mezo_lora`, `adam_prefix`), and `icl` for zero-shot with demonstrations;
`optimizer_config` keeps the optimizer's own name.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from .. import safe_files
from ..errors import ZobenchError

CONFIG_PREFIX = "cfg."


def find_runs(paths: Iterable[str | Path]) -> list[dict]:
    """One record per metrics.json under the paths. One that cannot be read (not a regular file, too large or
    too deep, not UTF-8, not JSON, not a JSON object) gets a one-line warning on stderr naming it, and stays in
    the report as status 'unreadable' (the failures table lists it) rather than stopping the report."""
    runs = []
    for root in paths:
        root = Path(root)
        for metrics_file in _metrics_files(root):
            record, problem = _read_metrics(metrics_file)
            if problem:
                record = _unreadable(metrics_file, problem)
            record["run_dir"] = str(metrics_file.parent)
            runs.append(record)
    return runs


def _read_metrics(path: Path) -> tuple[dict, str | None]:
    """(record, None), or ({}, what is wrong); every read by safe_files' rules."""
    try:
        record = safe_files.read_json(path)
    except OSError as error:
        return {}, error.strerror or str(error)
    except ZobenchError as error:
        return {}, _without(str(error), path)
    if not isinstance(record, dict):
        return {}, f"a JSON {type(record).__name__}, not an object"
    return record, None


def _unreadable(path: Path, problem: str) -> dict:
    print(f"zobench-report: warning: {path}: {problem}; listed as unreadable", file=sys.stderr)
    return {"status": "unreadable", "error": f"{path.name}: {problem}"}


def _without(message: str, path: Path) -> str:
    """A safe_files message without the path it begins with (the warning names the file once)."""
    return message.removeprefix(f"{path} ").removeprefix("is ") if message.startswith(str(path)) else message


def _metrics_files(root: Path) -> list[Path]:
    if (root / "metrics.json").exists():
        return [root / "metrics.json"]
    return sorted((path for path in root.rglob("metrics.json") if not _earlier_attempt(path)), key=natural_key)


def natural_key(path: Path) -> list:
    """Numbers in a path compare as numbers: a sweep's jobs 2_… before 10_… before 100_… (not as text)."""
    return [[int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)] for name in path.parts]


def _earlier_attempt(path: Path) -> bool:
    """RUN/attempts/N/metrics.json: the records of an attempt that ended before its first checkpoint and was
    started again (run_dir.py); the run is RUN's own metrics.json, reported once."""
    folder = path.parent
    return folder.parent.name == "attempts" and (folder.parent.parent / ".zobench-run").exists()


def load_runs(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Every run as one row: metrics.json fields plus the flattened config (`cfg.*` columns). A config.yaml
    that cannot be read (a FIFO, too large or deep, YAML aliases, not YAML) makes its run unreadable too."""
    rows = []
    for record in find_runs(paths):
        config_file = Path(record["run_dir"]) / "config.yaml"
        try:
            config = _config_columns(config_file)
        except ZobenchError as error:
            record = {**_unreadable(config_file, _without(str(error), config_file)), "run_dir": record["run_dir"]}
            config = {}
        row = {key: _scalar(value) for key, value in record.items()}
        row.update(config)
        row["optimizer_config"] = row.get("optimizer")
        row["optimizer"] = method_name(row)
        rows.append(row)
    runs = pd.DataFrame(rows)
    for column in ("task", "model", "optimizer", "status", "error", "metric", "seed", "dev_metric", "test_metric"):
        if column not in runs:
            runs[column] = None
    return runs


def method_name(row: dict[str, Any]) -> Any:
    """'mezo', 'mezo_lora', 'adam_prefix', 'zero_shot', 'icl' …: one row of a paper's table each."""
    optimizer = row.get("optimizer")
    if not isinstance(optimizer, str):
        return optimizer  # an unreadable run has no name
    peft = row.get("peft", row.get(CONFIG_PREFIX + "peft.name"))
    if isinstance(peft, str) and peft not in ("none", "null"):
        optimizer = f"{optimizer}_{peft}"
    demonstrations = row.get(CONFIG_PREFIX + "icl.k")
    if optimizer == "zero_shot" and isinstance(demonstrations, (int, float)) and demonstrations > 0:
        optimizer = "icl"
    return optimizer


def _config_columns(path: Path) -> dict[str, Any]:
    """The config's `cfg.*` columns; {} when there is none (the run is still listed, without hyperparameters to
    compare). A file safe_files refuses, or that is not YAML, raises its ZobenchError."""
    try:
        config = safe_files.read_yaml(path) or {}
    except OSError:
        return {}
    if not isinstance(config, dict):
        return {}
    return {CONFIG_PREFIX + key: value for key, value in _flatten(config).items()}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    # an explicit null is a value ("l_t: null" is a setting); NaN is kept for a key the run lacks
    return {prefix[:-1]: "null" if node is None else _scalar(node)}


def _scalar(value: Any) -> Any:
    """Lists and dicts become JSON text, so every cell is hashable and comparable."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def load_log(run_dir: str | Path) -> pd.DataFrame:
    """log.jsonl as a DataFrame (train and eval events); a line that is not JSON (a torn last one) is skipped.
    A log safe_files refuses (not a regular file, too large, a line too long, deep or with a number out of
    range) gives an empty frame, so that run has no curve and no speed row, and one warning naming it."""
    path = Path(run_dir) / "log.jsonl"
    try:
        rows = [row for row in safe_files.read_jsonl(path) if isinstance(row, dict)]
    except OSError:
        return pd.DataFrame()
    except ZobenchError as error:
        _warn_once(path, f"zobench-report: warning: {error}; that run has no curve or speed row")
        return pd.DataFrame()
    return pd.DataFrame(rows)


_warned: set[tuple] = set()  # the plots and the speed table both read each log: one warning per file


def _warn_once(path: Path, message: str) -> None:
    try:
        info = os.stat(path)
        key = (str(path), info.st_ino, info.st_size, info.st_mtime_ns)
    except OSError:
        key = (str(path),)
    if key not in _warned:
        _warned.add(key)
        print(message, file=sys.stderr)
