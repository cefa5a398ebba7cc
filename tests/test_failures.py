"""One failure policy (zobench/failures.py): every console command ends an error with one line on stderr and the
exit code of README's "Exit codes" table, whatever raised it."""

from __future__ import annotations

import errno
import sys

import pytest

from conftest import QUICK
from zobench.errors import Interrupted, ZobenchError


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("error, refused, code, line", [
    (ZobenchError("optimizer.lr must be positive"), (ZobenchError,), 2, "error: optimizer.lr must be positive"),
    (ZobenchError("the data changed"), (), 1, "error: the data changed"),
    (OSError(errno.ENOSPC, "No space left on device", "/r/m.json"), (), 1,
     "error: cannot read or write /r/m.json: No space left on device"),
    (KeyboardInterrupt(), (), 130, "interrupted"),
    (Interrupted("signal 15"), (ZobenchError,), 130, "interrupted"),
    (ValueError("reference CSV lacks\n  a column"), (ValueError,), 2, "error: reference CSV lacks a column"),
    (RuntimeError("a bug\non two lines"), (ZobenchError,), 1, "failed: RuntimeError: a bug on two lines"),
])
def test_each_error_has_the_exit_code_of_the_readme_table(error, refused, code, line):
    from zobench.failures import classify

    failure = classify(error, refused)
    assert (failure.exit_code, failure.line) == (code, line)


def test_a_config_hydra_cannot_compose_is_bad_input():
    from omegaconf.errors import ConfigKeyError

    from zobench.failures import classify

    assert classify(ConfigKeyError("Key 'nope' is not in struct")).exit_code == 2


def test_zobench_lengths_says_one_line_for_an_unexpected_error(monkeypatch, capsys):
    """Before the one policy, an error other than bad input or an OSError was a traceback."""
    from zobench import lengths

    def broken(*args, **kwargs):
        raise RuntimeError("tokenizer blew up\nwith a second line")

    monkeypatch.setattr(lengths, "length_report", broken)
    with pytest.raises(SystemExit) as exit_:
        lengths.main([*QUICK])
    assert exit_.value.code == 1
    assert _lines(capsys.readouterr().err) == ["zobench-lengths: failed: RuntimeError: tokenizer blew up with a "
                                               "second line"]


def test_zobench_report_says_one_line_for_an_unexpected_error(tmp_path, monkeypatch, capsys):
    from zobench.report import cli as report_cli

    def broken(*args, **kwargs):
        raise KeyError("a column")

    monkeypatch.setattr(report_cli, "build_report", broken)
    assert report_cli.main([str(tmp_path), "-o", str(tmp_path / "out"), "--no-plots"]) == 1
    assert _lines(capsys.readouterr().err) == ["zobench-report: failed: KeyError: 'a column'"]


def test_zobench_replay_puts_a_message_of_several_lines_on_one(tmp_path, monkeypatch, capsys):
    from zobench import replay

    def refused(*args, **kwargs):
        raise ZobenchError("the trajectory\nis short")

    monkeypatch.setattr(replay, "replay_run", refused)
    assert replay.main([str(tmp_path)]) == 1
    assert _lines(capsys.readouterr().err) == ["zobench-replay: error: the trajectory is short"]


def test_zobench_says_interrupted_once_when_stopped_before_its_job(tmp_path, monkeypatch, capsys):
    from zobench import cli, configs

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(configs, "register_tasks", stopped)  # Ctrl-C while the command line is prepared
    monkeypatch.setattr(sys, "argv", ["zobench", *QUICK, f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 130
    assert _lines(capsys.readouterr().err) == ["zobench: interrupted"]


def test_what_a_run_records_for_the_error_that_ended_it(tmp_path):
    """run_failure is what run() records in metrics.json and raises for the CLI (its except chain at merge)."""
    from zobench.failures import classify, run_failure

    full = OSError(errno.ENOSPC, "No space left on device")
    ended = run_failure(full, 3, tmp_path)
    assert (ended.status, ended.message, ended.traceback) == \
        ("failed", f"could not write to {tmp_path}: [Errno 28] No space left on device", True)
    assert isinstance(ended.raised, ZobenchError) and ended.raised.__cause__ is full
    assert classify(ended.raised).exit_code == 1  # the CLI's line names the run directory, exit 1
    stopped = run_failure(KeyboardInterrupt(), 3, tmp_path)
    assert (stopped.status, stopped.message, classify(stopped.raised).exit_code) == \
        ("interrupted", "interrupted at step 3", 130)
    bug = RuntimeError("a bug")
    assert (run_failure(bug, 3, tmp_path).message, run_failure(bug, 3, tmp_path).raised) == ("RuntimeError: a bug", bug)
    refused = ZobenchError("the data changed")
    assert run_failure(refused, 3, tmp_path).message == "the data changed"
