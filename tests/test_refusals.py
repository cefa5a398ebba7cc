"""Issue 18, part 4: templates on a budget, every bad key refused before any data loads, interruptions are
never data errors, and the messages that named no key or file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUICK, run_cli
from zobench.configs import compose
from zobench.data import load_split_pools
from zobench.data_checks import check_pool, read_split_file
from zobench.errors import Interrupted, ZobenchError
from zobench.tasks import PromptTemplate, load_task_definition
from zobench.spec import RunSpec

NESTED_LOOPS = "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}"
HUGE_TEXT = '{{ "x" * 2000000000 }}'
HUGE_TEXT_FLOAT = '{{ "x" * 2e9 }}'  # as filed: a TypeError to Python, named as over the budget all the same
# a folder that does not exist: a run that reached its data would say so; a refused key is named instead
NO_DATA = "task.data_dir=/nonexistent/zobench-data"


def _one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("payload", [NESTED_LOOPS, HUGE_TEXT, HUGE_TEXT_FLOAT],
                         ids=["nested-loops", "huge-text", "huge-text-float"])
def test_a_template_over_its_budget_is_refused_in_seconds_naming_it(tmp_path, payload):
    start = time.monotonic()
    result = run_cli(*QUICK, NO_DATA, f"task.prompt='{payload}'", f"results_dir={tmp_path}", timeout=120)
    line = _one_line(result)
    assert result.returncode == 2, result.stderr
    assert "task 'sst2'" in line and "task.prompt" in line and "budget" in line, line
    assert time.monotonic() - start < 60  # the payload alone would run for hours or exhaust memory
    assert not list(tmp_path.rglob("metrics.json"))  # refused before any run started


def test_a_received_overrides_file_with_a_costly_template_is_refused(tmp_path):
    received = tmp_path / "received"
    received.mkdir()
    overrides = [*QUICK, NO_DATA, f"task.prompt={NESTED_LOOPS!r}"]
    (received / "overrides.yaml").write_text(json.dumps(overrides))  # JSON is YAML
    (received / ".zobench-run").touch()  # as a copied run folder holds
    result = run_cli(f"resume={received}", timeout=120)
    line = _one_line(result)
    assert result.returncode == 2, result.stderr
    assert "task.prompt" in line and "budget" in line, line


def test_a_template_costly_only_on_some_rows_is_named_with_the_row(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"sentence": "fine", "label": 0}\n' * 3 +
                                          json.dumps({"sentence": "x" * 2000, "label": 1}) + "\n")
    task = {**load_task_definition("sst2"), "data_dir": str(tmp_path),
            "prompt": "{% for c in sentence %}{% for j in range(99999) %}{% endfor %}{% endfor %}{{ sentence }}"}
    PromptTemplate(task).check_budget()  # placeholders are short: nothing to refuse before the data
    rows = read_split_file(tmp_path / "train.jsonl")
    with pytest.raises(ZobenchError, match=r"train.jsonl \(train split\) line 4: .*task\.prompt .*budget"):
        check_pool(task, "train", rows, str(tmp_path / "train.jsonl"))


def test_bundled_templates_pass_their_budget():
    """Every bundled task's templates render its samples well inside the budget (no false refusal)."""
    from zobench.paths import tasks_dir
    from zobench.tasks import task_names

    for name in task_names():
        task = load_task_definition(name)
        template = PromptTemplate(task)
        template.check_budget()
        for path in sorted((tasks_dir() / "samples" / name).glob("*.jsonl")):
            for line in path.read_text().splitlines():
                if line.strip():
                    template.render(json.loads(line))


@pytest.mark.parametrize("overrides, key", [
    (["optimizer=adamezo", "optimizer.horizon=2.5"], "optimizer.horizon"),
    (["optimizer=zo_adam", "optimizer.betas=[0.9]"], "optimizer.betas"),
    (["optimizer=zo_adam", "optimizer.betas=[0.9,1.5]"], "optimizer.betas"),
    (["optimizer=zero_shot", "icl.k=-1"], "icl.k"),
    (["optimizer=addax", "+optimizer.zo_options.sparsity=2"], "optimizer.zo_options.sparsity"),
    (["optimizer=addax", "+optimizer.zo_options.eps=abc"], "optimizer.zo_options.eps"),
    (["optimizer=addax", "optimizer.zo=adam"], "optimizer.zo"),
    (["optimizer.schedule=cosine"], "optimizer.schedule"),
    (["optimizer=adam", "+optimizer.kwargs.betaz=0.9"], "optimizer.kwargs.betaz"),
    (["optimizer=adam", "optimizer.kwargs.eps=-1"], "optimizer.kwargs.eps"),
    (["optimizer.lr=true"], "optimizer.lr"),
    (["optimizer=adamezo", "optimizer.delta=0"], "optimizer.delta"),
    (["optimizer=lp", "optimizer.cv=1"], "optimizer.cv"),
    (["optimizer=lp", "optimizer.fit_intercept=maybe"], "optimizer.fit_intercept"),
    (["save_model=yes"], "save_model"),
    (["checkpoint.weights=1"], "checkpoint.weights"),
    (["precision.master_weights='false'"], "precision.master_weights"),
    (["precision.grad_clip=abc"], "precision.grad_clip"),
    (["train.early_stop.patience=0"], "train.early_stop.patience"),
    (["train.early_stop.metric=accuracy"], "train.early_stop.metric"),
    (["peft=lora", "peft.r=2.5"], "peft.r"),
    (["peft=lora", "peft.dropout=1.5"], "peft.dropout"),
    (["peft=prefix", "peft.init=zeros"], "peft.init"),
    (["task.train_as_classification='no'"], "task.train_as_classification"),
    (["+task.sizes.n_test=-3"], "task.sizes.n_test"),
    (["model.init_seed=-1"], "model.init_seed"),
    (["optimizer=mezo", "icl.k=4"], "icl.k"),
    (["optimizer=zero_shot", "peft=lora"], "peft=none"),
    (["optimizer=lp", "task=copa"], "optimizer=lp"),
    (["max_length=4096"], "max_length"),
])
def test_each_bad_key_is_refused_by_the_run_spec_naming_it(overrides, key):
    with pytest.raises(ZobenchError) as refused:
        RunSpec.from_cfg(compose([*QUICK, *overrides]))
    assert key in str(refused.value), str(refused.value)
    assert "\n" not in str(refused.value)


# the CLI's side of the table above, for two of its rows (each CLI run costs seconds of start-up)
@pytest.mark.parametrize("override, key", [("optimizer=adamezo optimizer.horizon=2.5", "optimizer.horizon"),
                                           ("optimizer=mezo icl.k=4", "icl.k=4")])
def test_a_bad_key_exits_2_before_the_data_is_read(tmp_path, override, key):
    result = run_cli(*QUICK, NO_DATA, *override.split(), f"results_dir={tmp_path}", timeout=120)
    line = _one_line(result)
    assert result.returncode == 2, result.stderr
    assert key in line and "data_dir" not in line, line
    assert not list(tmp_path.rglob("metrics.json"))


def test_max_length_beyond_the_model_positions_names_both_keys(tmp_path):
    result = run_cli(*QUICK, NO_DATA, "max_length=4096", f"results_dir={tmp_path}", timeout=120)
    line = _one_line(result)
    assert result.returncode == 2, result.stderr
    assert "max_length=4096" in line and "max_position_embeddings" in line and "2048" in line, line


def test_max_length_beyond_a_local_model_config_positions_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt", "max_position_embeddings": 64}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ZobenchError, match=r"max_length=256 .* 64 positions .*config\.json"):
        RunSpec.from_cfg(compose([*QUICK, "model=opt-125m", f"model.path={tmp_path}", "model.tokenizer=byte"]))


def test_a_pretrained_model_with_fewer_positions_is_refused_once_its_config_is_read(tmp_path, monkeypatch):
    """A hub model: no config before loading; models.load_model refuses right after reading it."""
    import transformers

    from zobench import models

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        classmethod(lambda cls, source, **kw: transformers.OPTConfig(max_position_embeddings=32)))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: pytest.fail("weights loaded before the check")))
    spec = {"name": "hub", "hub_id": "org/model", "init": "pretrained", "tokenizer": "byte"}
    with pytest.raises(ZobenchError, match=r"max_length=64 .* 32 positions"):
        models.load_model(spec, models.torch.device("cpu"), models.torch.float32, max_length=64)


def test_an_empty_model_path_says_what_the_folder_lacks(tmp_path):
    empty = tmp_path / "model"
    empty.mkdir()
    result = run_cli(*QUICK, NO_DATA, "model=opt-125m", f"model.path={empty}", f"results_dir={tmp_path}",
                     timeout=120)
    line = _one_line(result)
    assert result.returncode == 2, result.stderr
    assert f"model.path={empty} is empty" in line and "config.json" in line and "tokenizer" in line, line


def test_a_5000_digit_label_names_file_row_and_column(tmp_path):
    rows = [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}]
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train.jsonl").write_text(json.dumps(rows[0]) + "\n" + '{"sentence": "long", "label": ' +
                                          "7" * 5000 + "}\n")
    task = {**load_task_definition("sst2"), "data_dir": str(tmp_path)}
    with pytest.raises(ZobenchError) as refused:
        load_split_pools(task)
    message = str(refused.value)
    assert "train.jsonl (train split) line 2, column 'label'" in message and "5000 digits" in message, message
    assert len(message) < 300


def test_an_interruption_during_the_data_checks_is_not_a_bad_row(tmp_path, monkeypatch):
    from zobench import data_checks

    rows = data_checks.LocalRows([{"sentence": "fine", "label": 0}] * 5, tmp_path / "train.jsonl",
                                 lambda i: f"line {i + 1}")
    calls = []

    def interrupted_at_row_3(row, template, needed):
        calls.append(row)
        if len(calls) == 3:
            raise Interrupted("signal 15")

    monkeypatch.setattr(data_checks, "_check_row", interrupted_at_row_3)
    with pytest.raises(Interrupted):
        check_pool(load_task_definition("sst2"), "train", rows, "train.jsonl")


def test_two_sigterms_during_the_data_checks_exit_130_recorded_as_interrupted(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    row = json.dumps({"sentence": "a fine sentence to check", "label": 1}) + "\n"
    (data / "train.jsonl").write_text(row * 400_000)  # checking it takes far longer than the test waits
    (data / "validation.jsonl").write_text(row * 4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "zobench.cli", *QUICK, f"task.data_dir={data}",
                                "task.samples=false", f"results_dir={tmp_path / 'results'}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "results").rglob("metrics.json")):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        time.sleep(2.0)  # the job has started: reading, then checking 400k rows
        process.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Interrupted: signal" not in stderr, stderr
    metrics = json.loads(next((tmp_path / "results").rglob("metrics.json")).read_text())
    assert metrics["status"] == "interrupted" and "line" not in metrics["error"], metrics
