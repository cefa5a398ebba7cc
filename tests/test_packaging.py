"""A plain `pip install .` (a wheel) must ship conf/ and tasks/ and find them."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    return next(out.glob("zobench-*.whl"))


def test_wheel_ships_the_config_tree_tasks_and_samples(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("zobench/_conf/config.yaml", "zobench/_conf/model/opt-13b.yaml",
                 "zobench/_conf/optimizer/mezo.yaml", "zobench/_conf/experiment/quickstart.yaml",
                 "zobench/_conf/hydra/job_logging/zobench.yaml", "zobench/_tasks/sst2.yaml",
                 "zobench/_tasks/samples/sst2/train.jsonl", "zobench/_tasks/samples/sst2/validation.jsonl",
                 "zobench/_reference/mezo_table1_opt13b.csv"):
        assert path in names, path


def test_installed_wheel_finds_its_own_conf_and_tasks(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path)
    probe = ("import zobench.paths as p; from zobench.configs import compose; "
             "from zobench.report.references import default_reference_dir; print(default_reference_dir()); "
             "print(p.conf_dir()); print(p.tasks_dir()); print(compose(['task=sst2']).task.prompt)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    reference, conf, tasks, prompt = result.stdout.strip().splitlines()[-4:]
    assert conf == str(tmp_path / "zobench" / "_conf") and tasks == str(tmp_path / "zobench" / "_tasks")
    assert reference == str(tmp_path / "zobench" / "_reference")
    assert "It was" in prompt
