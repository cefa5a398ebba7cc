"""The benchmark scripts run as the README and benchmarks/RESULTS.md say, and print their ratios
(on the tiny model: the figures themselves are for benchmarks/RESULTS.md, not for tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), "--model", "opt-tiny", *args],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _ratio(text: str, label: str) -> float:
    match = re.search(rf"{re.escape(label)}\s+([0-9.]+)", text)
    assert match, f"no '{label}' line in:\n{text}"
    return float(match.group(1))


def test_zo_step_prints_the_step_and_memory_ratios():
    text = _run("zo_step.py", "--repeats", "2")
    for label in ("step / (2 x forward)", "zobench / reference step", "MeZO / evaluation"):
        assert _ratio(text, label) > 0


def test_optimizers_compares_ip_sgd_with_sgd_at_batch_one():
    text = _run("optimizers.py", "--only", "ip_sgd,sgd", "--batch-size", "1", "--steps", "1")
    rows = {line.split()[0] for line in text.splitlines() if line.split()}
    assert {"inference", "mezo", "ip_sgd", "sgd"} <= rows
    assert 0 < _ratio(text, "IP-SGD peak / SGD peak:") < 1.5


def test_profile_splits_a_mezo_step():
    text = _run("profile_step.py", "--steps", "1")
    shares = {label: float(m.group(1)) for label in ("forward passes", "engine passes over θ")
              if (m := re.search(rf"{label}\s+[0-9.]+\s+([0-9.]+)%", text))}
    assert len(shares) == 2 and 50 < sum(shares.values()) <= 100.5, text
    assert "z generation (aten::normal_)" in text


def test_received_files_prints_the_costs_of_the_checks():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "received_files.py"), "--repeats", "1", "--hash-mib", "4",
                          "--log-lines", "500"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"rendering \d+ sample rows: .* ratio [0-9.]+", out.stdout), out.stdout
    assert re.search(r"SHA-256 of a 4 MiB file: [0-9.]+ CPU s per GiB", out.stdout), out.stdout
    assert re.search(r"read_jsonl .* ratio [0-9.]+", out.stdout), out.stdout
