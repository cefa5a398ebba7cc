"""zobench-lengths: the token-length distribution of a task's sampled training set (Addax's L_T)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from zobench.byte_tokenizer import byte_tokenizer
from zobench.configs import compose
from zobench.data import load_split_pools, sample_splits
from zobench.errors import ZobenchError
from zobench.evaluate import MAX_NEW_TOKENS
from zobench.lengths import PERCENTILES, length_report
from zobench.tasks import PromptTemplate, load_task_definition

SMALL = ["model=opt-tiny", "task.samples=true", "data.n_train=16", "data.n_dev=8"]


def _lengths_by_hand(name: str, max_length: int) -> tuple[list[int], int]:
    """Byte tokenizer: one token per byte plus BOS; the longest candidate; left-truncated to max_length, for
    generation to max_length - max_new_tokens (MeZO utils.py encode_prompt). An example counts as truncated
    when a sequence or the prompt is cut."""
    task = load_task_definition(name) | {"samples": True}
    pools, source = load_split_pools(task)
    train = sample_splits(pools, n_train=16, n_dev=8, n_test=0, seed=0, source=source).train
    template, tokenizer = PromptTemplate(task), byte_tokenizer()
    room = MAX_NEW_TOKENS if task["kind"] == "generation" else 0
    lengths, truncated = [], 0
    for row in train:
        example = template.render(row)
        full = max(len(tokenizer((example.prompt + c).strip(" "))["input_ids"]) for c in example.candidates)
        prompt = len(tokenizer(example.prompt.strip(" "))["input_ids"])
        lengths.append(min(full, max_length - room))
        truncated += full > max_length - room or prompt > max_length - room
    return lengths, truncated


@pytest.mark.parametrize("name", ["rte", "squad"])
def test_report_matches_the_lengths_counted_by_hand(name):
    report = length_report(compose([*SMALL, f"task={name}", "max_length=300"]), l_t=200)
    expected, truncated = _lengths_by_hand(name, 300)
    assert sorted(report.lengths) == sorted(expected)
    summary = report.summary()
    assert summary["count"] == 16 and summary["min"] == min(expected) and summary["max"] == max(expected)
    for q in PERCENTILES:  # nearest rank: the smallest length that at least q% of examples do not exceed
        value = summary[f"p{q}"]
        assert value in expected and np.mean(np.array(expected) <= value) >= q / 100
        assert np.mean(np.array(expected) < value) < q / 100
    assert summary["at_or_under"] == sum(length <= 200 for length in expected)
    assert summary["truncated"] == truncated and (truncated > 0) == (name == "squad")


def test_an_empty_training_set_is_a_clear_error():
    with pytest.raises(ZobenchError, match="no training examples left.*lower data.n_dev"):
        length_report(compose(["model=opt-tiny", "task=rte", "task.samples=true"]))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "zobench.lengths", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_command_line_prints_the_distribution_and_the_l_t_count():
    result = _cli(*SMALL, "task=rte", "l_t=180")
    assert result.returncode == 0, result.stderr
    expected, _ = _lengths_by_hand("rte", 2048)
    under = sum(length <= 180 for length in expected)
    assert "task rte, model opt-tiny: 16 training examples" in result.stdout
    assert f"min {min(expected)}" in result.stdout and f"max {max(expected)}" in result.stdout
    assert f"at or under l_t=180: {under} of 16" in result.stdout


def test_command_line_errors_are_one_line():
    for args, words in ((["task=nope"], "unknown task 'nope'; valid: boolq"),
                        ([*SMALL, "l_t=short"], "l_t must be a whole number"),
                        ([*SMALL, "nokey=1"], "Could not override 'nokey'")):
        result = _cli(*args)
        assert result.returncode == 2
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.stderr


def test_console_script_is_declared():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["zobench-lengths"] == "zobench.lengths:main"
