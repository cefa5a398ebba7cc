"""Local split files read directly (no cache to go stale), and every row of every split checked up front.

Reading: `train.jsonl`, `.json`, `.csv` or `.parquet` are parsed on each run with json / pandas / pyarrow,
so a file rewritten in place (even with the same size and mtime) is never served from a cache; two
files for one split (`train.jsonl` beside `train.csv`) are refused rather than one silently ignored.

Checking: before any model is loaded, each row of the train pool (train and dev are drawn from it) and of
the test pool is rendered by the task's template, and what the task cannot use is one line naming the
file, the row and the column: a null or empty text, a list where text is printed, a label that is null,
fractional, out of range or matches no candidate, gold answers that are not texts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .errors import Interrupted, ZobenchError
from .tasks import BadValue, PromptTemplate

FILE_FORMATS = (".jsonl", ".json", ".parquet", ".csv")


class LocalRows(list):
    """A split file's rows (dicts, in file order) with what a `datasets.Dataset` pool offers the sampler
    (len, [i], column_names, to_list) and where each row is in the file."""

    def __init__(self, rows: list[dict[str, Any]], path: Path, place: Callable[[int], str]):
        super().__init__(rows)
        self.path, self.place = path, place
        self.column_names = list(dict.fromkeys(key for row in rows for key in row))

    def to_list(self) -> list[dict[str, Any]]:
        return list(self)


def split_file(folder: Path, split: str) -> Path | None:
    """The one file that holds `split` in `folder` (None: none); two candidates are refused."""
    found = [folder / f"{split}{suffix}" for suffix in FILE_FORMATS if (folder / f"{split}{suffix}").exists()]
    if len(found) > 1:
        raise ZobenchError(f"{folder} holds {' and '.join(p.name for p in found)} for the '{split}' split: "
                           f"keep one (zobench will not guess which)")
    return found[0] if found else None


def read_split_file(path: Path) -> LocalRows:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ZobenchError(f"could not read {path}: {error.strerror or error}") from error
    if not data.strip():
        raise ZobenchError(f"{path} is empty: no rows")
    if path.suffix in (".jsonl", ".json", ".csv"):
        _check_utf8(path, data)
    reader = {".jsonl": _read_json, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}[path.suffix]
    rows, place = reader(path, data)
    if not rows:
        raise ZobenchError(f"{path} holds no rows")
    return LocalRows(rows, path, place)


def _check_utf8(path: Path, data: bytes) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ZobenchError(f"{path} line {line}: not UTF-8 text (byte {data[error.start]:#04x} at offset "
                           f"{error.start}); save the file as UTF-8") from error


def _read_json(path: Path, data: bytes):
    """A JSON array of objects, or JSON Lines (one object per line; also accepted in a .json file)."""
    text = data.decode("utf-8-sig")  # a byte-order mark (some editors write one) is not part of the JSON
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text, parse_int=_json_int)
        except json.JSONDecodeError as error:
            raise ZobenchError(f"{path} line {error.lineno}: not valid JSON ({error.msg})") from error
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ZobenchError(f"{path} item {index + 1}: not an object with the dataset's columns")
        return rows, lambda i: f"item {i + 1}"
    rows, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, parse_int=_json_int)
        except json.JSONDecodeError as error:
            raise ZobenchError(f"{path} line {number}: not valid JSON ({error.msg})") from error
        if not isinstance(row, dict):
            raise ZobenchError(f"{path} line {number}: not an object with the dataset's columns")
        rows.append(row)
        lines.append(number)
    return rows, lambda i: f"line {lines[i]}"


def _json_int(digits: str) -> int | str:
    """An integer too long for Python's int() (4300 digits) stays its digits: the row check then names its
    column, instead of the parser failing on the whole file with Python's conversion-limit error."""
    return int(digits) if len(digits) <= 4000 else digits


def _read_csv(path: Path, data: bytes):
    import io

    import pandas as pd

    try:
        frame = pd.read_csv(io.BytesIO(data), encoding="utf-8-sig")
    except (ValueError, pd.errors.ParserError) as error:
        raise ZobenchError(f"{path}: not a readable CSV file ({_first_line(error)})") from error
    rows = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
    return rows, lambda i: f"row {i + 1} (line {i + 2}, after the header)"


def _read_parquet(path: Path, data: bytes):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    except (OSError, pa.ArrowException) as error:
        raise ZobenchError(f"{path}: not a readable Parquet file ({_first_line(error)})") from error
    return rows, lambda i: f"row {i + 1}"


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_pool(task: dict[str, Any], role: str, pool, where: str) -> None:
    """Every row of one pool renders into an Example the task can score; else one line naming the row.

    `pool` is LocalRows (rows placed by line) or a datasets.Dataset (rows placed by index)."""
    template = PromptTemplate(task)
    place = getattr(pool, "place", lambda i: f"row {i + 1}")
    needed = [c for c in task["columns"] if c in template.text_columns or c in template.gold_columns]
    for index, row in enumerate(pool):  # a Dataset yields its rows batch by batch, not all at once
        try:
            _check_row(row, template, needed)
        except BadValue as error:
            column = f", column '{error.column}'" if error.column else ""
            raise ZobenchError(f"{where} ({role} split) {place(index)}{column}: {error}") from error
        except ZobenchError as error:  # a template that needs what the row lacks, or an unsafe one
            raise ZobenchError(f"{where} ({role} split) {place(index)}: {error}") from error
        except Interrupted:  # Ctrl-C or SIGTERM while checking: the run's end, not a bad row
            raise
        except Exception as error:  # a filter given a value of the wrong type, e.g. a number for a text
            raise ZobenchError(f"{where} ({role} split) {place(index)}: the task's template cannot use this "
                               f"row ({type(error).__name__}: {error})") from error


def _check_row(row: dict[str, Any], template: PromptTemplate, needed: list[str]) -> None:
    for column in needed:
        value = row.get(column)
        if value is None:
            what = ("null text" if column in template.text_columns else
                    "null label" if template.gold_columns == [column] else "null value")
            raise BadValue(what if column in row else f"no value ({what})", column)
        if column in template.text_columns:
            if not isinstance(value, str):
                raise BadValue(f"expected text, got a {type(value).__name__}: {value!r:.60}", column)
            if not value.strip():
                raise BadValue("empty text", column)
    try:
        template.render(row)
    except BadValue as error:
        if error.column is None and error.gold and len(template.gold_columns) == 1:
            error.column = template.gold_columns[0]
        raise

