"""The benchmark scripts run as the README and benchmarks/RESULTS.md say, and print their ratios
(on the tiny model: the figures themselves are for benchmarks/RESULTS.md, not for tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow
def test_distributed_prints_each_row_and_zo_data_sends_scalars_where_ddp_sends_gradients():
    """Issue 20: every row runs at 1 and 2 ranks (torchrun, gloo); the bytes each rank passes to torch.distributed's
    collectives per step are counted, and ZO data's (a few scalars) are under 1% of DDP's (the gradients)."""
    text = _run("distributed.py", "--steps", "1", "--batch-size", "2")
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line[:1].strip()}  # the table's
    for row in ("zo-data", "zo-directions", "zo-shard", "fsdp-adam", "ddp-adam"):
        assert row in rows, text
    params = int(re.search(r"= ([0-9,]+) bytes in float32", text).group(1).replace(",", ""))
    sent = {row: float(rows[row][5].replace(",", "")) for row in ("zo-data", "ddp-adam", "fsdp-adam")}
    assert 0 < sent["zo-data"] < 0.01 * sent["ddp-adam"], text
    assert sent["ddp-adam"] >= params and sent["fsdp-adam"] >= params, text  # the gradients, all of them
    assert float(rows["zo-data"][7]) == sent["zo-data"], text  # the counter agrees with zobench's own count
    assert 0 < _ratio(text, "ZO data / DDP bytes sent per rank per step:") < 0.01
