"""Bad inputs get one line before anything is loaded: unsafe templates, bad data rows (named by file, row and
column), ambiguous or unreadable split files, and config values that are not what their key needs."""

from __future__ import annotations

import json

import pytest

from zobench.configs import compose
from zobench.data import load_split_pools
from zobench.errors import ZobenchError
from zobench.tasks import PromptTemplate, load_task_definition
from zobench.spec import RunSpec

GOOD = [{"sentence": f"a fine sentence {i}", "label": i % 2} for i in range(6)]


def _folder(tmp_path, train=None, validation=None, name="sst2"):
    """A task.data_dir folder with train.jsonl and validation.jsonl (rows as given, or good ones)."""
    for split, rows in (("train", train), ("validation", validation)):
        rows = GOOD if rows is None else rows
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {**load_task_definition(name), "data_dir": str(tmp_path)}


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# -- templates: Jinja's sandbox -------------------------------------------------------------------------
def test_a_template_cannot_run_a_shell_command(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"{{{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}}}"
    task = {**load_task_definition("sst2"), "prompt": payload}
    with pytest.raises(ZobenchError) as error:
        PromptTemplate(task).render(GOOD[0])
    assert "refused by Jinja's sandbox" in _one_line(error)
    assert not marker.exists()


def test_an_unsafe_template_is_refused_while_checking_the_data(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"{{{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}}}"
    task = {**_folder(tmp_path), "prompt": "{{ sentence }}" + payload}
    with pytest.raises(ZobenchError, match="refused by Jinja's sandbox"):
        load_split_pools(task)
    assert not marker.exists()


def test_data_rows_are_rendered_literally():
    row = {"sentence": "{{ 7 * 7 }} {% if 1 %}x{% endif %}", "label": 0}
    assert PromptTemplate(load_task_definition("sst2")).render(row).prompt == row["sentence"] + " It was"


# -- data rows: file, row, column -----------------------------------------------------------------------
BAD_ROWS = [
    ({"sentence": "fine", "label": "positive"}, "label", "matches no candidate"),
    ({"sentence": "fine", "label": 7}, "label", "out of range"),
    ({"sentence": "fine", "label": -1}, "label", "out of range"),
    ({"sentence": "fine", "label": None}, "label", "null label"),
    ({"sentence": "fine", "label": 1.5}, "label", "not a whole number"),
    ({"sentence": None, "label": 1}, "sentence", "null text"),
    ({"sentence": "  ", "label": 1}, "sentence", "empty text"),
    ({"sentence": ["a", "b"], "label": 1}, "sentence", "expected text, got a list"),
    ({"label": 1}, "sentence", "no value"),
]


@pytest.mark.parametrize("split", ["train", "validation"])
@pytest.mark.parametrize("bad, column, reason", BAD_ROWS)
def test_a_bad_row_is_named_by_file_line_and_column(tmp_path, split, bad, column, reason):
    rows = GOOD[:3] + [bad] + GOOD[3:]  # the 4th line of the file
    task = _folder(tmp_path, **{split: rows})
    with pytest.raises(ZobenchError) as error:
        load_split_pools(task)
    message = _one_line(error)
    assert f"{tmp_path / (split + '.jsonl')}" in message and "line 4" in message
    assert f"column '{column}'" in message and reason in message


def test_text_labels_that_name_a_candidate_are_accepted(tmp_path):
    rows = [{"sentence": "fine", "label": " great"}, {"sentence": "bad", "label": "terrible"}]
    pools, _ = load_split_pools(_folder(tmp_path, train=rows * 3))
    template = PromptTemplate(_folder(tmp_path))
    assert [template.render(row).gold for row in pools["train"][:2]] == [[1], [0]]


def test_a_label_that_names_no_candidate_fails_the_run_before_the_model(quick_cfg, tmp_path, monkeypatch):
    """The whole run: refused with the file named, no model loaded, metrics.json says failed."""
    from zobench import build
    from zobench import run as run_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(build, "load_model", no_model)
    data = tmp_path / "data"
    data.mkdir()
    _folder(data, validation=GOOD[:2] + [{"sentence": "fine", "label": "positive"}])
    cfg = quick_cfg(f"task.data_dir={data}", "task.samples=false")
    with pytest.raises(ZobenchError, match="validation.jsonl.*line 3, column 'label'"):
        run_module.run(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_generation_answers_must_be_texts(tmp_path):
    row = json.loads(_sample("squad"))
    broken = {**row, "answers": {"text": [], "answer_start": []}}
    folder = {"train": [row, broken], "validation": [row]}
    for split, rows in folder.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {**load_task_definition("squad"), "data_dir": str(tmp_path)}
    with pytest.raises(ZobenchError, match=r"train.jsonl \(train split\) line 2, column 'answers': gold answers "
                                           r"must be a non-empty list of texts, got \[\]"):
        load_split_pools(task)
    broken = {**row, "answers": {"text": [None], "answer_start": [0]}}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(ZobenchError, match=r"line 2, column 'answers': gold answers .*got \[None\]"):
        load_split_pools(task)


def test_drop_answer_spans_must_be_texts(tmp_path):
    row = json.loads(_sample("drop"))
    broken = {**row, "answers_spans": {"spans": [], "types": []}}
    for split, rows in (("train", [row]), ("validation", [row, row, broken])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ZobenchError, match=r"validation.jsonl \(test split\) line 3, column 'answers_spans'"):
        load_split_pools({**load_task_definition("drop"), "data_dir": str(tmp_path)})


def _sample(name: str) -> str:
    from zobench.paths import tasks_dir

    return (tasks_dir() / "samples" / name / "train.jsonl").read_text().splitlines()[0]


def test_every_bundled_sample_passes_the_checks():
    from zobench.tasks import task_names

    for name in task_names():
        load_split_pools({**load_task_definition(name), "samples": True})


# -- split files ------------------------------------------------------------------------------------------
def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    task = _folder(tmp_path)
    (tmp_path / "train.jsonl").write_bytes(b'{"sentence": "ok", "label": 0}\n{"sentence": "caf\xe9", "label": 1}\n')
    with pytest.raises(ZobenchError, match=r"train.jsonl line 2: not UTF-8"):
        load_split_pools(task)


def test_an_empty_file_says_it_is_empty(tmp_path):
    task = _folder(tmp_path)
    (tmp_path / "validation.jsonl").write_text("")
    with pytest.raises(ZobenchError, match=r"validation.jsonl is empty"):
        load_split_pools(task)


def test_two_files_for_one_split_are_refused(tmp_path):
    task = _folder(tmp_path)
    (tmp_path / "train.csv").write_text("sentence,label\nfine,1\n")
    with pytest.raises(ZobenchError, match=r"train.jsonl and train.csv for the 'train' split"):
        load_split_pools(task)


def test_csv_rows_are_named_after_the_header(tmp_path):
    task = _folder(tmp_path)
    (tmp_path / "train.jsonl").unlink()
    (tmp_path / "train.csv").write_text("sentence,label\nfine,1\n,0\n")
    with pytest.raises(ZobenchError, match=r"train.csv \(train split\) row 2 \(line 3.*column 'sentence': null text"):
        load_split_pools(task)


def test_a_file_rewritten_with_the_same_size_and_mtime_is_read_again(tmp_path):
    import os

    task = _folder(tmp_path)
    path = tmp_path / "train.jsonl"
    first, _ = load_split_pools(task)
    stat = path.stat()
    path.write_text(path.read_text().replace("fine", "good"))  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again, _ = load_split_pools(task)
    assert first["train"][0]["sentence"] == "a fine sentence 0"
    assert again["train"][0]["sentence"] == "a good sentence 0"


# -- config values ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "train.steps must be a whole number, got 'abc'"),
    ("train.steps=3.7", "train.steps must be a whole number, got 3.7"),
    ("data.n_train=0.5", "data.n_train must be a whole number"),
    ("seed=-1", "seed must be in [0, 2**32 - 1] (the optimizer seed"),
    ("data.seed=-1", "data.seed must be in [0, 2**32 - 1] (the data sampling seed"),
])
def test_a_bad_config_value_names_its_key(override, message):
    with pytest.raises(ZobenchError) as error:
        RunSpec.from_cfg(compose([override]))
    assert message in _one_line(error)


def test_whole_floats_are_accepted():
    RunSpec.from_cfg(compose(["train.steps=1e3"]))


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    task = _folder(tmp_path)
    (tmp_path / "train.jsonl").unlink()
    (tmp_path / "train.csv").write_bytes("\ufeffsentence,label\nfine,1\n".encode())
    pools, _ = load_split_pools(task)
    assert pools["train"][0] == {"sentence": "fine", "label": 1}
