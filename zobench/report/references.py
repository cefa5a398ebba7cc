"""The papers' own numbers: results/reference/*.csv, one file per paper table.

Columns: paper, table, model, task, optimizer, metric, value, source. Names follow zobench's
(tasks `sst2`…, optimizers `mezo`, `adam`…, rows without training such as `zero_shot`); accuracy
and F1 are in percent, as the papers print them. `source` says where in the paper the number is.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..paths import reference_dir

COLUMNS = ["paper", "table", "model", "task", "optimizer", "metric", "value", "source"]


def default_reference_dir() -> Path | None:
    """results/reference of a source checkout, or the copy a wheel ships; None where there is neither."""
    try:
        return reference_dir()
    except FileNotFoundError:
        return None


def load_references(folder: str | Path | None) -> pd.DataFrame:
    """All reference CSVs in one DataFrame (empty, with the columns, when there are none)."""
    files = sorted(Path(folder).glob("*.csv")) if folder else []
    frames = [_read(path) for path in files]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS + ["file"])


def _read(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype={column: str for column in COLUMNS if column != "value"})
    missing = [column for column in COLUMNS if column not in frame]
    if missing:
        raise ValueError(f"{path}: missing columns {', '.join(missing)} (expected {', '.join(COLUMNS)})")
    frame["value"] = pd.to_numeric(frame["value"], errors="raise")
    frame["file"] = path.name
    return frame[COLUMNS + ["file"]]
