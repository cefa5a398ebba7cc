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
import sys
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml

CONFIG_PREFIX = "cfg."


def find_runs(paths: Iterable[str | Path]) -> list[dict]:
    """One record per metrics.json under the paths. One that cannot be read (not UTF-8, not JSON, not a JSON
    object) gets a one-line warning on stderr naming it, and stays in the report as status 'unreadable'
    (the failures table lists it) rather than stopping the report."""
    runs = []
    for root in paths:
        root = Path(root)
        for metrics_file in _metrics_files(root):
            record, problem = _read_metrics(metrics_file)
            if problem:
                print(f"zobench-report: warning: {metrics_file}: {problem}; listed as unreadable", file=sys.stderr)
                record = {"status": "unreadable", "error": f"metrics.json: {problem}"}
            record["run_dir"] = str(metrics_file.parent)
            runs.append(record)
    return runs


def _read_metrics(path: Path) -> tuple[dict, str | None]:
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        return {}, error.strerror or str(error)
    except UnicodeDecodeError as error:
        return {}, f"not UTF-8 text (byte offset {error.start})"
    except json.JSONDecodeError as error:
        return {}, f"not JSON ({error.msg}, line {error.lineno})"
    if not isinstance(record, dict):
        return {}, f"a JSON {type(record).__name__}, not an object"
    return record, None


def _metrics_files(root: Path) -> list[Path]:
    if (root / "metrics.json").exists():
        return [root / "metrics.json"]
    return sorted(root.rglob("metrics.json"))


def load_runs(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Every run as one row: metrics.json fields plus the flattened config (`cfg.*` columns)."""
    rows = []
    for record in find_runs(paths):
        row = {key: _scalar(value) for key, value in record.items()}
        row.update(_config_columns(Path(record["run_dir"]) / "config.yaml"))
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
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
        return {}  # the run is still listed; it just has no hyperparameters to compare
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
    """log.jsonl as a DataFrame (train and eval events); a torn last line is skipped."""
    rows = []
    try:
        lines = (Path(run_dir) / "log.jsonl").read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return pd.DataFrame()
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return pd.DataFrame(rows)
