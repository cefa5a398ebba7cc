"""What zobench does with files it did not write itself: a received run folder is data, never code.

The one place for the rules every command follows when it reads a run folder (metrics.json, state.json,
log.jsonl, trajectory.jsonl, config.yaml, overrides.yaml) or writes into a run or report folder:

- read only regular files: a FIFO, a device (`/dev/zero`), a socket or a folder is refused, and opening
  never blocks (O_NONBLOCK), so a FIFO cannot hang a command;
- read at most a size limit per file, and refuse what is larger;
- JSON nested deeper than MAX_DEPTH or holding integers longer than MAX_INT_DIGITS is refused before it is
  parsed (Python's parser would recurse until RecursionError, or spend minutes on a 10^400-digit number);
- YAML may not use anchors or aliases (a "billion laughs" file expands to gigabytes once walked): zobench's
  own YAML never has them;
- never write through a symbolic link (`open_for_write`, `refuse_link`): a link in a received folder would
  let it choose which file of the user's is overwritten.

Every refusal is a `ZobenchError` naming the file, one line. This module imports neither torch nor the
runner, so `zobench-report` uses it too.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import ZobenchError

MiB = 1 << 20
# Limits generous for any run zobench writes, small enough that a hostile file cannot exhaust memory.
JSON_LIMIT = 64 * MiB  # metrics.json, state.json (a few KiB in practice)
RECORDS_LIMIT = 4096 * MiB  # log.jsonl, trajectory.jsonl (a 100k-step run: ~30 MiB)
YAML_LIMIT = 4 * MiB  # config.yaml, overrides.yaml (~10 KiB)
MAX_DEPTH = 64  # zobench's JSON is at most ~5 levels deep
MAX_INT_DIGITS = 40  # enough for any seed, count or byte size


def read_bytes(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; anything else is refused in one line."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise
    except OSError as error:
        raise ZobenchError(f"cannot read {path}: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ZobenchError(f"{path} is {_kind(info.st_mode)}, not a regular file: zobench reads only regular "
                               f"files from a run folder")
        if info.st_size > limit:
            raise ZobenchError(f"{path} is {info.st_size:,} bytes, more than the {limit:,} zobench reads from such "
                               f"a file: not a file zobench wrote")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(MiB, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # it grew while being read
                raise ZobenchError(f"{path} is larger than the {limit:,} bytes zobench reads from such a file")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: str | Path, limit: int) -> str:
    path = Path(path)
    data = read_bytes(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ZobenchError(f"{path} is not UTF-8 text (byte offset {error.start})") from None


def loads_json(text: str, where: str | Path) -> Any:
    """json.loads with the depth and integer-length limits checked first (one line naming `where`)."""
    check_json_shape(text, where)
    try:
        return json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as error:
        raise ZobenchError(f"{where} is not valid JSON ({error.msg}, line {error.lineno})") from None
    except _TooLong:
        raise ZobenchError(f"{where} holds an integer longer than {MAX_INT_DIGITS} digits: not a file zobench "
                           f"wrote") from None


def read_json(path: str | Path, limit: int = JSON_LIMIT) -> Any:
    path = Path(path)
    return loads_json(read_text(path, limit), path)


def read_yaml(path: str | Path, limit: int = YAML_LIMIT) -> Any:
    """yaml.safe_load of a regular, small file without anchors or aliases."""
    path = Path(path)
    return loads_yaml(read_text(path, limit), path)


def loads_yaml(text: str, where: str | Path) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())  # YAML errors span lines
        raise ZobenchError(f"{where} is not YAML zobench can read ({reason})") from None


def check_json_shape(text: str, where: str | Path) -> None:
    """Nesting deeper than MAX_DEPTH is refused by a scan that does not recurse."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise ZobenchError(f"{where} is nested more than {MAX_DEPTH} levels deep: not a file zobench wrote")
        elif char in "]}":
            depth -= 1


def refuse_link(path: str | Path) -> None:
    """Refuse a path that is a symbolic link (zobench never writes through one)."""
    path = Path(path)
    if path.is_symlink():
        raise ZobenchError(f"{path} is a symbolic link (to {os.readlink(path)}): zobench does not write through "
                           f"links; remove it or choose another folder")


def open_for_write(path: str | Path, mode: str = "w", **kwargs):
    """open(path, mode) for writing or appending, refused if the last component is a symbolic link
    (O_NOFOLLOW: no window between a check and the open)."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= os.O_APPEND if "a" in mode else os.O_TRUNC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as error:
        if path.is_symlink():
            refuse_link(path)
        raise
    return os.fdopen(fd, mode, **kwargs)


class _TooLong(ValueError):
    pass


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise _TooLong(digits[:20])
    return int(digits)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def _no_alias_loader():
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, "anchors and aliases are refused (zobench's own YAML "
                                                  "never has them)", event.start_mark)
            return super().compose_node(parent, index)

    return NoAliasLoader


class _LazyLoader:
    """yaml is imported on first use (the report's start-up stays light)."""

    def __init__(self):
        self._loader = None

    def __call__(self, stream):
        if self._loader is None:
            self._loader = _no_alias_loader()
        return self._loader(stream)


_NoAliasLoader = _LazyLoader()
