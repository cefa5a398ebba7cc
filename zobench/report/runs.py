"""Finding runs: every folder under the given paths that holds a metrics.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable


def find_runs(paths: Iterable[str | Path]) -> list[dict]:
    runs = []
    for root in paths:
        root = Path(root)
        candidates = [root / "metrics.json"] if (root / "metrics.json").exists() else sorted(root.rglob("metrics.json"))
        for metrics_file in candidates:
            try:
                record = json.loads(metrics_file.read_text())
            except (OSError, json.JSONDecodeError) as error:
                record = {"status": "unreadable", "error": str(error)}
            record["run_dir"] = str(metrics_file.parent)
            runs.append(record)
    return runs
