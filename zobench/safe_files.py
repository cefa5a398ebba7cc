"""What zobench does with files it did not write itself: a received run folder is data, never code.

The one place for the rules every command follows when it reads a run folder (metrics.json, state.json,
log.jsonl, trajectory.jsonl, config.yaml, overrides.yaml) or writes into a run or report folder:

- read only regular files: a FIFO, a device (`/dev/zero`), a socket or a folder is refused, and opening
  never blocks (O_NONBLOCK), so a FIFO cannot hang a command;
- read at most a size limit per file, and refuse what is larger; records (.jsonl: `read_jsonl`,
  `read_jsonl_lines`) are read as a stream, line by line, each line at most LINE_LIMIT bytes;
- JSON nested deeper than MAX_DEPTH or holding numbers longer than MAX_INT_DIGITS digits is refused before it
  is parsed (Python's parser would recurse until RecursionError, or refuse a 5,000-digit int with a
  ValueError), by scans that cost little more than reading the text; a number too large for a float
  (1e999999) is refused as it is parsed (zobench writes an infinity as `Infinity`); text that is not JSON
  at all is `InvalidJson` (a killed run's torn line, which a reader of records may skip);
- YAML may not use anchors or aliases (a "billion laughs" file expands to gigabytes once walked): zobench's
  own YAML never has them; nor nest deeper than MAX_DEPTH, nor hold ints Python will not convert;
- never write through a symbolic link (`open_for_write`, `refuse_link`): a link in a received folder would
  let it choose which file of the user's is overwritten; nor into a FIFO (the open would block) or a device.

Every refusal is a `ZobenchError` naming the file, one line. This module imports neither torch nor the
runner, so `zobench-report` uses it too.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from .errors import ZobenchError
from .failures import one_line

MiB = 1 << 20
# Limits generous for any run zobench writes, small enough that a hostile file cannot exhaust memory.
JSON_LIMIT = 64 * MiB  # metrics.json, state.json (a few KiB in practice)
RECORDS_LIMIT = 1024 * MiB  # log.jsonl, trajectory.jsonl (a 100k-step run: ~30 MiB); held in memory once read
LINE_LIMIT = 1 * MiB  # one record of log.jsonl or trajectory.jsonl (~200 bytes)
YAML_LIMIT = 4 * MiB  # config.yaml, overrides.yaml (~10 KiB)
MAX_DEPTH = 64  # zobench's JSON is at most ~5 levels deep
MAX_INT_DIGITS = 40  # enough for any seed, count or byte size (a float's repr has at most 17 digits)


def read_bytes(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; anything else is refused in one line."""
    path = Path(path)
    fd = open_regular(path, limit)
    try:
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


def open_regular(path: str | Path, limit: float = math.inf) -> int:
    """A read-only descriptor of a regular file of at most `limit` bytes (FileNotFoundError passes through).
    O_NONBLOCK: opening a FIFO returns at once (and is then refused) instead of waiting for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
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
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_jsonl_lines(path: str | Path, limit: int = RECORDS_LIMIT, line_limit: int = LINE_LIMIT) -> list[str]:
    """The lines of a .jsonl record file (trajectory.jsonl), read as a stream: a regular file of at most `limit`
    bytes, each line at most `line_limit` bytes, UTF-8, and each line's JSON shape checked (check_json_shape),
    so that json.loads of any of them is safe. A last line without its newline (a killed run's half line) is
    returned as it is: the caller decides whether to drop it."""
    path = Path(path)
    lines = []
    for number, raw, _ in _jsonl(path, limit, line_limit):
        try:
            lines.append(raw.decode("utf-8").rstrip("\r\n"))
        except UnicodeDecodeError as error:
            raise ZobenchError(f"{path} line {number} is not UTF-8 text (byte {error.start})") from None
    return lines


def read_jsonl(path: str | Path, limit: int = RECORDS_LIMIT, line_limit: int = LINE_LIMIT) -> list[Any]:
    """Each line of a .jsonl record file (log.jsonl) parsed by loads_json's rules, read as read_jsonl_lines
    reads; a line that is not JSON (a killed run's half line) is None."""
    path = Path(path)
    records = []
    for number, raw, may_overflow in _jsonl(path, limit, line_limit):
        try:
            records.append(json.loads(raw, **({"parse_float": _finite_float} if may_overflow else {})))
        except UnicodeDecodeError as error:
            if raw.endswith(b"\n"):  # not a last line cut inside a character
                raise ZobenchError(f"{path} line {number} is not UTF-8 text (byte {error.start})") from None
            records.append(None)
        except json.JSONDecodeError:
            records.append(None)
        except _OutOfRange as error:
            raise ZobenchError(f"{path} line {number} holds the number {error.args[0]}, too large for a float: "
                               f"not a file zobench wrote") from None
    return records


def _jsonl(path: Path, limit: int, line_limit: int):
    """(line number, the line's bytes, whether a number may overflow), each line's shape checked."""
    fd = open_regular(path, limit)
    total = 0
    try:
        with os.fdopen(fd, "rb", closefd=False) as handle:
            for number, raw in enumerate(iter(lambda: handle.readline(line_limit + 1), b""), 1):
                total += len(raw)
                if total > limit:  # it grew while being read
                    raise ZobenchError(f"{path} is larger than the {limit:,} bytes zobench reads from such a file")
                if len(raw) > line_limit and not raw.endswith(b"\n"):
                    raise ZobenchError(f"{path} line {number} is longer than the {line_limit:,} bytes of any record "
                                       f"zobench writes: not a file zobench wrote")
                yield number, raw, check_json_shape(raw, _Line(path, number))
    finally:
        os.close(fd)


class _Line:
    """`PATH line N`, formatted only for a message (most lines never need it)."""

    def __init__(self, path: Path, number: int):
        self.path, self.number = path, number

    def __str__(self) -> str:
        return f"{self.path} line {self.number}"


def read_text(path: str | Path, limit: int) -> str:
    path = Path(path)
    data = read_bytes(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ZobenchError(f"{path} is not UTF-8 text (byte offset {error.start})") from None


class InvalidJson(ZobenchError):
    """Text that is not JSON at all (a torn line, say), as opposed to JSON refused for its shape or size."""


def loads_json(text: str, where: str | Path) -> Any:
    """json.loads with the depth and number-length limits checked first (one line naming `where`)."""
    may_overflow = check_json_shape(text, where)
    try:
        return json.loads(text, **({"parse_float": _finite_float} if may_overflow else {}))
    except json.JSONDecodeError as error:
        raise InvalidJson(f"{where} is not valid JSON ({error.msg}, line {error.lineno})") from None
    except _OutOfRange as error:
        raise ZobenchError(f"{where} holds the number {error.args[0]}, too large for a float: not a file zobench "
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
    except (yaml.YAMLError, ValueError) as error:  # ValueError: an int of more digits than Python converts
        raise ZobenchError(f"{where} is not YAML zobench can read ({one_line(error)})") from None  # YAML's span lines


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INNERMOST_PAIR = re.compile(r"[\[{][\]}]")
_LONG_NUMBER = re.compile(r"\d{%d,}" % (MAX_INT_DIGITS + 1))
# The text's bytes with every digit made 0, E made e and - made +: long digit runs and 3-digit exponents are
# then found by plain substring searches (much faster than a regular expression tried at every position).
_MARKS = bytes.maketrans(b"123456789E-", b"000000000e+")
_LONG_RUN = b"0" * (MAX_INT_DIGITS + 1)


def check_json_shape(text: str | bytes, where: object) -> bool:
    """Nesting deeper than MAX_DEPTH, or a number of more than MAX_INT_DIGITS digits, is refused by scans that
    neither recurse nor loop in Python over the characters, so a hostile file costs little more than reading
    it; a text that cannot fail (no long digit run, few brackets: a line of log.jsonl) is not scanned further.
    Returns whether a number may be too large for a float (it has a 3-digit exponent): loads_json checks those.
    """
    marks = (text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")).translate(_MARKS)
    outside = None
    if _LONG_RUN in marks:  # digits inside strings (a hash, an id) are text: look again outside them
        outside = _outside_strings(text)
        if _LONG_NUMBER.search(outside):
            raise ZobenchError(f"{where} holds a number longer than {MAX_INT_DIGITS} digits: not a file zobench "
                               f"wrote")
    if marks.count(b"[") + marks.count(b"{") > MAX_DEPTH:
        outside = _outside_strings(text) if outside is None else outside
        if _nesting(_NOT_BRACKET.sub("", outside)) > MAX_DEPTH:
            raise ZobenchError(f"{where} is nested more than {MAX_DEPTH} levels deep: not a file zobench wrote")
    return b"e000" in marks or b"e+000" in marks


def _outside_strings(text: str | bytes) -> str:
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return _STRING.sub('""', text)


def _nesting(brackets: str) -> int:
    """How deep brackets nest. Each pass removes the innermost pairs, so after k passes what is left nests
    k levels less; once no pair is left, the unclosed openers that remain add their count."""
    passes = 0
    while passes <= MAX_DEPTH:
        fewer = _INNERMOST_PAIR.sub("", brackets)
        if len(fewer) == len(brackets):
            break
        brackets, passes = fewer, passes + 1
    return passes + brackets.count("[") + brackets.count("{")


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
    flags = os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= os.O_RDWR if "+" in mode else os.O_WRONLY
    flags |= os.O_APPEND if "a" in mode else os.O_TRUNC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        if path.is_symlink():
            refuse_link(path)
        if path.exists() and not path.is_file():  # a FIFO without a reader (ENXIO), a device, a folder
            raise ZobenchError(f"{path} is {_kind(path.stat().st_mode)}, not a regular file: zobench writes only "
                               f"regular files; remove it or choose another folder") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # O_TRUNC and O_NONBLOCK mean nothing to a FIFO with a reader
            raise ZobenchError(f"{path} is {_kind(info.st_mode)}, not a regular file: zobench writes only regular "
                               f"files; remove it or choose another folder")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, mode, **kwargs)


class _OutOfRange(ValueError):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # a literal such as 1e999999; zobench writes an infinity as `Infinity`
        raise _OutOfRange(text[:20])
    return value


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def _no_alias_loader():
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            event = self.peek_event()
            if self.check_event(yaml.AliasEvent):
                raise yaml.composer.ComposerError(None, None, "anchors and aliases are refused (zobench's own YAML "
                                                  "never has them)", event.start_mark)
            if self.depth >= MAX_DEPTH:  # composing recurses once per level
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                                  event.start_mark)
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

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
