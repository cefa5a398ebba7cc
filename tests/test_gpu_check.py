"""benchmarks/gpu_check.sh, which no machine here can run on CUDA, is checked as far as a CPU allows: its shell
parses (and passes shellcheck where installed), and its dry run (GPU_CHECK_DEVICE=cpu) runs the same zobench
commands on the tiny model: every optimizer in fp16 and bf16, a killed-and-resumed MeZO and Adam run, a replay."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_the_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        checked = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout


@pytest.mark.slow
def test_the_gpu_checks_dry_run_runs_every_zobench_command_on_cpu(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=2000,
                          env={**os.environ, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_OUT": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    out = done.stdout
    assert "all parts passed" in out
    for line in ("resume mezo ", "resume adam ", "replay mezo: rebuilt weights"):
        assert re.search(re.escape(line) + r".*bit-identical", out), line
    table = re.findall(r"^\d+_(\w+?)_sst2_opt-tiny\s+(float16|bfloat16)\s+completed", out, re.M)
    assert len(table) == 28 and len({name for name, _ in table}) == 14, out
