"""A received run folder is data (issue 18): FIFOs, devices, huge or deep files, YAML aliases, links and
forged names in it cost one line, never a hang, a MemoryError, a traceback, a write elsewhere or a forged row.

Every hazardous read runs under `bounded()` (an alarm and a cap on the address space), so a regression fails
the test instead of hanging it or exhausting the machine's memory."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
from pathlib import Path

import pytest
import yaml

from conftest import QUICK, run_cli
from zobench.errors import ZobenchError
from zobench.replay import main as replay_main
from zobench.report.cli import main as report_main
from zobench.run_dir import MARKER, RecordFile, RunDir, atomic_write_text

DEEP_JSON = "[" * 200_000 + "]" * 200_000
HUGE_INT_JSON = '{"status": "completed", "seed": ' + "7" * 400 + "}"
BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


class StillRunning(BaseException):
    """Not an Exception (nor an OSError, as TimeoutError is): no `except` in zobench swallows it."""


@contextlib.contextmanager
def bounded(seconds: int = 20, extra_bytes: int = 2 << 30):
    """Raise StillRunning after `seconds`, and every second after (a blocked open or read is interrupted), and
    MemoryError beyond `extra_bytes` more address space than the process has now."""
    def still_running(*_):
        raise StillRunning(f"still running after {seconds} s")

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as status:
        in_use = int(re.search(r"VmSize:\s+(\d+)", status.read()).group(1)) * 1024
    previous = signal.signal(signal.SIGALRM, still_running)
    resource.setrlimit(resource.RLIMIT_AS, (in_use + extra_bytes, hard))
    signal.setitimer(signal.ITIMER_REAL, seconds, 1)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(autouse=True, scope="module")
def _libraries_loaded_before_the_cap(tmp_path_factory):
    """pandas' Arrow strings and matplotlib reserve address space when first used: not under the cap."""
    runs = tmp_path_factory.mktemp("warm")
    write_run(runs, "run")
    assert report_main([str(runs), "-o", str(runs / "out")]) == 0


def plant(path: Path, kind: str) -> None:
    """Replace `path` by a hostile file of `kind`."""
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")
    else:
        path.write_text({"deep": DEEP_JSON, "huge_int": HUGE_INT_JSON, "laughs": BILLION_LAUGHS}[kind])


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# -- resume: RunDir.read_json, RecordFile, and the real `zobench resume=` ----------------------------------
@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "deep", "huge_int"])
def test_resume_reads_metrics_json_only_as_a_small_shallow_regular_file(tmp_path, kind):
    plant(tmp_path / "metrics.json", kind)
    with bounded(), pytest.raises(ZobenchError) as refused:
        RunDir(tmp_path).read_json("metrics.json")
    assert str(tmp_path / "metrics.json") in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "link_to_a_users_file"])
def test_record_files_are_never_opened_through_a_link_or_as_a_fifo(tmp_path, kind):
    users_file = tmp_path / "notes.txt"
    users_file.write_text("mine\n")
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    if kind == "link_to_a_users_file":
        log.symlink_to(users_file)
    else:
        plant(log, kind)
    with bounded(), pytest.raises(ZobenchError, match="log.jsonl"):
        RecordFile(log)
    assert users_file.read_text() == "mine\n"


def test_zobench_resume_of_a_folder_with_a_fifo_as_metrics_is_one_line(tmp_path):
    run_dir = tmp_path / "received"
    run_dir.mkdir()
    (run_dir / MARKER).write_text("{}\n")
    (run_dir / "overrides.yaml").write_text(yaml.safe_dump([*QUICK, "train.steps=2"]))
    plant(run_dir / "metrics.json", "fifo")
    result = run_cli(f"resume={run_dir}", timeout=120)
    assert result.returncode == 2  # refused as the folder is claimed, before any run starts
    assert "metrics.json is a FIFO, not a regular file" in one_line(result.stderr)


def test_run_folder_writes_refuse_links(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").symlink_to(elsewhere / "metrics.json")
    with pytest.raises(ZobenchError, match="symbolic link"):
        atomic_write_text(run_dir / "metrics.json", "{}")
    (run_dir / "model.partial").symlink_to(elsewhere)
    with pytest.raises(ZobenchError, match="model.partial is a symbolic link"):
        RunDir(run_dir).save_folder("model", lambda folder: (folder.mkdir(), (folder / "w").write_text("x")))
    (run_dir / "model.partial").unlink()
    (run_dir / "model").symlink_to(elsewhere)
    with pytest.raises(ZobenchError, match="model is a symbolic link"):
        RunDir(run_dir).save_folder("model", lambda folder: (folder.mkdir(), (folder / "w").write_text("x")))
    assert list(elsewhere.iterdir()) == []
    log = run_dir / "log.jsonl"  # a regular record file is hashed and appended to as before
    log.write_text('{"step": 1}\n')
    records = RecordFile(log)
    records.write_line('{"step": 2}')
    records.close()
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n' and records.bytes == len(log.read_bytes())


# -- zobench-replay: config.yaml, metrics.json, trajectory.jsonl --------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real two-step MeZO run (its config.yaml, metrics.json, log.jsonl, trajectory.jsonl)."""
    from zobench.configs import compose
    from zobench.run import run

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run(compose([*QUICK, "train.steps=2", "train.eval_interval=0"]), run_dir)
    return run_dir


@pytest.fixture
def received(finished_run, tmp_path):
    copy = tmp_path / "received"
    shutil.copytree(finished_run, copy)
    return copy


@pytest.mark.parametrize("name, kind", [("config.yaml", "fifo"), ("config.yaml", "dev_zero"),
                                        ("config.yaml", "laughs"), ("metrics.json", "dev_zero"),
                                        ("metrics.json", "deep"), ("trajectory.jsonl", "fifo"),
                                        ("trajectory.jsonl", "dev_zero"), ("trajectory.jsonl", "deep")])
def test_replay_refuses_a_hostile_file_in_one_line(received, name, kind, capsys):
    plant(received / name, kind)
    with bounded():
        assert replay_main([str(received), "--out", str(received.parent / "out")]) == 1
    line = one_line(capsys.readouterr().err)
    assert str(received / name) in line and ("regular file" in line or "nested" in line or "aliases" in line)
    assert not (received.parent / "out").exists()


# -- zobench-report --------------------------------------------------------------------------------------
def write_run(root: Path, name: str, task: str = "sst2", optimizer: str = "mezo", model: str = "opt-tiny",
              seed: int = 0) -> Path:
    """A completed run as the runner leaves it: metrics.json, config.yaml and a log with dev evaluations."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({
        "task": task, "model": model, "optimizer": optimizer, "seed": seed, "status": "completed",
        "metric": "accuracy", "dev_metric": 0.7, "test_metric": 0.6, "steps": 2}))
    (run_dir / "config.yaml").write_text(f"seed: {seed}\noptimizer:\n  name: mezo\n  lr: 0.001\n")
    records = [{"event": "train", "step": step, "loss": 0.7 - step / 10, "elapsed_s": step, "forward_passes": 2 * step}
               for step in (1, 2)]
    records += [{"event": "eval", "split": "dev", "step": 2, "metric": 0.7, "elapsed_s": 3.0, "forward_passes": 4}]
    (run_dir / "log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return run_dir


def table_rows(markdown: str) -> list[list[str]]:
    """A GFM table's rows (header first, the separator left out) split into cells as GFM splits them: at every
    `|` not escaped by a backslash."""
    rows = []
    for line in markdown.splitlines():
        cells, cell, escaped = [], "", False
        for char in line.strip()[1:-1]:
            if escaped or char == "\\":
                escaped = not escaped and char == "\\"
                cell += char
            elif char == "|":
                cells.append(cell)
                cell = ""
            else:
                cell += char
        rows.append([*cells, cell])
    return [row for row in rows if not all(set(cell.strip()) <= set(":-") for cell in row)]


@pytest.mark.parametrize("name, kind", [("metrics.json", "fifo"), ("metrics.json", "dev_zero"),
                                        ("metrics.json", "deep"), ("metrics.json", "huge_int"),
                                        ("config.yaml", "fifo"), ("config.yaml", "laughs")])
def test_report_lists_a_run_with_a_hostile_file_as_unreadable(tmp_path, name, kind, capsys):
    runs = tmp_path / "runs"
    write_run(runs, "good")
    plant(write_run(runs, "bad", seed=1) / name, kind)
    with bounded():
        assert report_main([str(runs), "-o", str(tmp_path / "out"), "--no-plots"]) == 0
    warning = one_line(capsys.readouterr().err)
    assert str(runs / "bad" / name) in warning and "unreadable" in warning
    rows = table_rows((tmp_path / "out" / "runs.md").read_text())
    assert len(rows) == 3 and sorted(row[5].strip() for row in rows[1:]) == ["completed", "unreadable"]


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "deep", "1e999999", "huge_int"])
def test_report_skips_the_curve_of_a_hostile_log_and_warns_once(tmp_path, kind, capsys):
    runs = tmp_path / "runs"
    write_run(runs, "good")
    log = write_run(runs, "bad", optimizer="addax") / "log.jsonl"
    if kind in ("1e999999", "huge_int"):
        number = "1e999999" if kind == "1e999999" else "9" * 400
        log.write_text(log.read_text() + f'{{"event": "train", "step": 3, "loss": {number}}}\n')
    else:
        plant(log, kind)
    with bounded(60):
        assert report_main([str(runs), "-o", str(tmp_path / "out")]) == 0
    assert str(log) in one_line(capsys.readouterr().err)
    assert (tmp_path / "out" / "plots" / "sst2.png").stat().st_size > 0
    speed = (tmp_path / "out" / "speed.md").read_text()
    assert "mezo" in speed and "addax" not in speed  # the good run's row stays, the bad one's curve is left out
    assert len(table_rows((tmp_path / "out" / "runs.md").read_text())) == 3


@pytest.mark.parametrize("link", ["report", "report/runs.md", "report/plots"])
def test_report_never_writes_through_a_link_in_a_received_folder(tmp_path, link, capsys):
    received = tmp_path / "received"
    write_run(received, "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    if link != "report":
        (received / "report").mkdir()
    (received / link).symlink_to(elsewhere if link != "report/runs.md" else elsewhere / "keep.txt")
    assert report_main([str(received)]) == 1  # the default output: received/report
    assert "is a symbolic link" in one_line(capsys.readouterr().err)
    assert sorted(path.name for path in elsewhere.iterdir()) == ["keep.txt"]
    assert (elsewhere / "keep.txt").read_text() == "mine"


def test_forged_names_cannot_add_rows_or_columns_to_the_tables(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs, "a", task="sst2\n| forged | row | x | x | x | x | x | x |", optimizer="mezo|evil")
    write_run(runs, "b", task="rte\\", optimizer="adam\r\n| x |", model="opt\u2028tiny")
    write_run(runs, "c", task="cb|", optimizer="mezo", model="opt\\|13b")
    assert report_main([str(runs), "-o", str(tmp_path / "out"), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    runs_md = table_rows((tmp_path / "out" / "runs.md").read_text())
    assert len(runs_md) == 1 + 3 and {len(row) for row in runs_md} == {9}
    accuracy = table_rows((tmp_path / "out" / "accuracy.md").read_text())
    assert len(accuracy) == 1 + 3 and {len(row) for row in accuracy} == {2 + 3 + 1}  # model, optimizer, 3 tasks, avg
    for name in ("selection", "cost", "memory", "comparison", "speed", "failures"):
        text = (tmp_path / "out" / f"{name}.md").read_text()
        assert len({len(row) for row in table_rows(text)}) <= 1, name
    assert "\u2028" not in printed and "\r" not in printed
    latex = (tmp_path / "out" / "runs.tex").read_text()
    assert "\n\n" not in latex.strip() and latex.count(r"\\") == 1 + 3  # a row end per row, nothing more
