"""Where a task's rows come from (hub, a local folder, or the bundled samples) and MeZO's sampling.

Sources, picked by the task config:
  task.samples=true   the small hand-written files in tasks/samples/<task>/ (explicit choice only)
  task.data_dir=DIR   split files train/validation/test as .jsonl/.json/.parquet/.csv, or a
                      `save_to_disk` folder, with the dataset's own columns
  (neither)           the hub: datasets.load_dataset(hub.path, hub.name)
A real run never falls back to the samples: an unreachable hub is an error that says what to do.
Local split files are read directly, never through the datasets cache, and every row of every split is
checked before a model is loaded (zobench/data_checks.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .data_checks import FILE_FORMATS, check_pool, read_split_file, split_file
from .errors import Interrupted, ZobenchError
from .hub import announce
from .paths import tasks_dir

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """Rows sampled by MeZO's protocol; `source` says where they were read from."""

    train: list[dict[str, Any]]
    dev: list[dict[str, Any]]
    test: list[dict[str, Any]]
    source: str
    train_pool: Any = None  # the whole train split: MeZO's pool of ICL demonstrations (zobench/icl.py)


def load_split_pools(task: dict[str, Any]):
    """The task's train and test pools as `datasets.Dataset`s (columns checked), and a description."""
    if task.get("samples") and task.get("data_dir"):
        raise ZobenchError("choose one data source: task.samples=true or task.data_dir=DIR, not both")
    if task.get("samples"):
        folder = tasks_dir() / "samples" / task["name"]
        pools = {role: _read_local(folder, split) for role, split in task["splits"].items()}
        source = f"bundled samples {folder}"
    elif task.get("data_dir"):
        folder = Path(str(task["data_dir"])).expanduser()
        if not folder.is_dir():
            raise ZobenchError(f"task.data_dir={folder} is not a folder")
        pools = {role: _read_local(folder, split) for role, split in task["splits"].items()}
        source = f"local folder {folder}"
    else:
        pools = {role: _read_hub(task, split) for role, split in task["splits"].items()}
        source = f"hub dataset {task['hub']['path']}/{task['hub'].get('name')}"
    for role, pool in pools.items():
        missing = [c for c in task["columns"] if c not in pool.column_names]
        if missing:
            where = getattr(pool, "path", None) or source
            raise ZobenchError(
                f"{where} ({role} split) lacks column '{missing[0]}' that task '{task['name']}' needs; "
                f"it has: {', '.join(pool.column_names)}"
            )
    for role, pool in pools.items():
        check_pool(task, role, pool, str(getattr(pool, "path", None) or source))
    return pools, source


def _read_local(folder: Path, split: str):
    if (folder / "dataset_dict.json").exists():  # a DatasetDict written by save_to_disk
        import datasets

        saved = datasets.load_from_disk(str(folder))
        if split not in saved:
            raise ZobenchError(f"{folder} (save_to_disk) has no split '{split}'; it has: {', '.join(saved)}")
        return saved[split]
    path = split_file(folder, split)
    if path is not None:
        return read_split_file(path)
    wanted = ", ".join(f"{split}{suffix}" for suffix in FILE_FORMATS)
    raise ZobenchError(f"no '{split}' split in {folder}: looked for {wanted} or a save_to_disk folder")


def _read_hub(task: dict[str, Any], split: str):
    import datasets

    hub = task["hub"]
    announce(f"dataset {hub['path']}/{hub.get('name')} split '{split}'",
             "task.data_dir=DIR (the split files) or task.samples=true (the bundled samples)")
    try:
        return datasets.load_dataset(hub["path"], hub.get("name"), split=split)
    except Interrupted:  # Ctrl-C or SIGTERM while loading: the run's end, not an unreachable hub
        raise
    except Exception as error:  # connection, missing dataset, offline mode: all mean "not reachable"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ZobenchError(
            f"could not load dataset {hub['path']}/{hub.get('name')} split '{split}' from the hub ({reason}); "
            f"offline, set task.data_dir=DIR (files {split}.jsonl etc. in the dataset's columns) "
            f"or task.samples=true for the bundled samples"
        ) from error


def sample_task(task: Mapping[str, Any], data) -> Splits:
    """A task's splits as a run samples them: data.n_train/n_dev/n_test (spec.DataSpec) capped by the
    task's `sizes`."""
    pools, source = load_split_pools(task)
    sizes = {key: min(getattr(data, key), int(task["sizes"].get(key, 10**12)))
             for key in ("n_train", "n_dev", "n_test")}
    splits = sample_splits(pools, seed=data.seed, source=source, **sizes)
    splits.train_pool = pools["train"]
    if not splits.train:
        raise ZobenchError(f"task '{task['name']}': no training examples left: the train split has "
                           f"{len(pools['train'])} rows and dev takes {sizes['n_dev']} of them; "
                           f"lower data.n_dev ({source})")
    return splits


def sample_splits(pools, n_train: int, n_dev: int, n_test: int, seed: int, source: str) -> Splits:
    """MeZO's protocol (large_models/tasks.py sample_subset; run.py main).

    Train and dev: one seeded permutation of the train pool, the first n_train + n_dev rows; dev is the
    *last* n_dev of them, so a small pool shrinks train, not dev. Test: the same seed's permutation of
    the test pool (the dataset's validation split), first n_test rows.
    """
    train_pool, test_pool = pools["train"], pools["test"]
    train_rows = _permuted_subset(train_pool, n_train + n_dev, seed)
    if n_train + n_dev > len(train_pool):
        log.warning("n_train + n_dev = %d > %d training rows: train shrinks to %d",
                    n_train + n_dev, len(train_pool), max(len(train_pool) - n_dev, 0))
    dev = train_rows[len(train_rows) - n_dev:] if n_dev else []
    train = train_rows[: len(train_rows) - len(dev)]
    test = _permuted_subset(test_pool, n_test, seed)
    return Splits(train=train, dev=dev, test=test, source=source)


def _permuted_subset(pool, count: int, seed: int) -> list[dict[str, Any]]:
    order = np.random.RandomState(seed).permutation(len(pool))[:count]
    return [pool[int(i)] for i in order]
