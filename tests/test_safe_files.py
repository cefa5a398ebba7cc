"""zobench/safe_files.py: the rules for files zobench did not write, one function at a time."""

from __future__ import annotations

import os
import time

import pytest

from zobench import safe_files
from zobench.errors import ZobenchError
from zobench.safe_files import (InvalidJson, check_json_shape, loads_json, loads_yaml, open_for_write,
                                read_jsonl_lines)


def test_json_numbers_python_would_choke_on_are_refused_in_one_line():
    for text, reason in (('{"seed": ' + "9" * 5000 + "}", "longer than 40 digits"),
                         ('{"loss": 1e999999}', "too large for a float"),
                         ('{"loss": -1E+400}', "too large for a float")):
        with pytest.raises(ZobenchError, match=reason):
            loads_json(text, "metrics.json")
    kept = loads_json('{"loss": Infinity, "id": "' + "7" * 100 + '", "lr": 1.2345678901234567e-07}', "m.json")
    assert kept["loss"] == float("inf") and kept["id"] == "7" * 100  # digits in a string are text
    # depth: measured outside strings, without recursion, and without a Python loop per character
    check_json_shape("[" * 64 + "]" * 64, "x")
    check_json_shape('{"a": "' + "[" * 1000 + '\\"["}', "x")  # brackets inside a string, an escaped quote
    for deep in ("[" * 65 + "]" * 65, '{"a": ' * 100, "[{" * 40 + "}]" * 40):
        with pytest.raises(ZobenchError, match="nested more than 64 levels"):
            check_json_shape(deep, "x")
    started = time.perf_counter()
    check_json_shape("[" + ",".join(["[]"] * 1_000_000) + "]", "x")  # wide, not deep
    with pytest.raises(ZobenchError):
        check_json_shape("[" * 500_000 + "]" * 500_000, "x")
    assert time.perf_counter() - started < 10  # regular expressions, not a Python loop per character


def test_not_json_is_its_own_error():
    with pytest.raises(InvalidJson, match="not valid JSON"):
        loads_json('{"status": "comp', "metrics.json")


def test_yaml_too_deep_or_with_too_long_an_int_is_one_line():
    for text, reason in (("[" * 5000, "nested more than 64 levels"), ("a:\n" + "".join(
            f"{'  ' * i}k:\n" for i in range(1, 70)) + "  " * 70 + "v: 1\n", "nested more than 64 levels"),
                         ("seed: " + "1" * 5000, "not YAML zobench can read"),
                         ("a: &x [1, 2]\nb: *x\n", "aliases are refused")):
        with pytest.raises(ZobenchError, match=reason):
            loads_yaml(text, "config.yaml")
    assert loads_yaml("optimizer:\n  lr: 1.0e-06\n  betas: [0.9, 0.99]\n", "c")["optimizer"]["lr"] == 1e-6


def test_jsonl_lines_are_read_as_a_stream_with_a_limit_per_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\r\n{"step": 3, "lo')  # a killed run's half line last
    assert read_jsonl_lines(path) == ['{"step": 1}', '{"step": 2}', '{"step": 3, "lo']
    path.write_text('{"step": 1}\n{"text": "' + "x" * 2000 + '"}\n')
    with pytest.raises(ZobenchError, match=r"log.jsonl line 2 is longer than the 1,000 bytes"):
        read_jsonl_lines(path, line_limit=1000)
    path.write_text('{"step": 1}\n' + "[" * 100 + "\n")
    with pytest.raises(ZobenchError, match="log.jsonl line 2 is nested more than 64"):
        read_jsonl_lines(path)
    path.write_bytes(b'{"step": 1}\n{"s": "\xff"}\n')
    with pytest.raises(ZobenchError, match="line 2 is not UTF-8"):
        read_jsonl_lines(path)
    with pytest.raises(ZobenchError, match="is 23 bytes, more than the 10 "):
        read_jsonl_lines(path, limit=10)


def test_a_fifo_is_refused_for_reading_and_for_writing_without_waiting(tmp_path):
    fifo = tmp_path / "runs.md"
    os.mkfifo(fifo)
    with pytest.raises(ZobenchError, match="is a FIFO, not a regular file"):
        read_jsonl_lines(fifo)
    with pytest.raises(ZobenchError, match="is a FIFO, not a regular file"):
        safe_files.read_json(fifo)
    with pytest.raises(ZobenchError, match="is a FIFO, not a regular file"):
        open_for_write(fifo)  # no reader: a plain open for writing would wait for one forever
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # with a reader, too
    try:
        with pytest.raises(ZobenchError, match="is a FIFO, not a regular file"):
            open_for_write(fifo)
    finally:
        os.close(reader)


def test_open_for_write_appends_reads_back_and_refuses_links(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"one\n")
    with open_for_write(path, "a+b") as handle:
        handle.seek(0)
        assert handle.read() == b"one\n"
        handle.write(b"two\n")
    assert path.read_bytes() == b"one\ntwo\n"
    (tmp_path / "link").symlink_to(path)
    with pytest.raises(ZobenchError, match="is a symbolic link"):
        open_for_write(tmp_path / "link", "w")
    assert path.read_bytes() == b"one\ntwo\n"
