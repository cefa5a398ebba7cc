"""Data sources and MeZO's sampling protocol."""

from __future__ import annotations

import json

import pytest

from zobench.data import load_split_pools, sample_splits
from zobench.errors import ZobenchError
from zobench.tasks import PromptTemplate, load_task_definition


def _rows(n):
    return [{"sentence": f"sentence number {i}", "label": i % 2, "idx": i} for i in range(n)]


def _write(folder, split, rows, fmt):
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    if fmt == "jsonl":
        frame.to_json(folder / f"{split}.jsonl", orient="records", lines=True)
    elif fmt == "json":
        (folder / f"{split}.json").write_text(json.dumps(rows))
    elif fmt == "csv":
        frame.to_csv(folder / f"{split}.csv", index=False)
    elif fmt == "parquet":
        frame.to_parquet(folder / f"{split}.parquet")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "save_to_disk"])
def test_local_folder_in_every_format_reads_the_same_rows(tmp_path, fmt):
    task = {**load_task_definition("sst2"), "data_dir": str(tmp_path)}
    if fmt == "save_to_disk":
        import datasets

        datasets.DatasetDict({s: datasets.Dataset.from_list(_rows(n))
                              for s, n in (("train", 30), ("validation", 10))}).save_to_disk(str(tmp_path))
    else:
        _write(tmp_path, "train", _rows(30), fmt)
        _write(tmp_path, "validation", _rows(10), fmt)
    pools, source = load_split_pools(task)
    assert str(tmp_path) in source
    assert len(pools["train"]) == 30 and len(pools["test"]) == 10
    assert pools["train"][3]["sentence"] == "sentence number 3" and int(pools["train"][3]["label"]) == 1


def test_samples_and_data_dir_together_are_refused(tmp_path):
    task = {**load_task_definition("sst2"), "data_dir": str(tmp_path), "samples": True}
    with pytest.raises(ZobenchError, match="choose one data source"):
        load_split_pools(task)


def test_mezo_protocol_dev_is_the_tail_of_one_permutation():
    import numpy as np

    pools = {"train": _rows(100), "test": _rows(40)}
    splits = sample_splits(pools, n_train=20, n_dev=10, n_test=15, seed=3, source="test")
    order = np.random.RandomState(3).permutation(100)[:30]
    assert [r["idx"] for r in splits.train] == order[:20].tolist()
    assert [r["idx"] for r in splits.dev] == order[20:].tolist()
    assert [r["idx"] for r in splits.test] == np.random.RandomState(3).permutation(40)[:15].tolist()
    # Same seed, same sample; another seed, another one.
    again = sample_splits(pools, n_train=20, n_dev=10, n_test=15, seed=3, source="test")
    assert again.train == splits.train
    assert sample_splits(pools, n_train=20, n_dev=10, n_test=15, seed=4, source="test").train != splits.train


def test_small_pool_keeps_dev_and_shrinks_train():
    pools = {"train": _rows(250), "test": _rows(56)}  # CB's split sizes
    splits = sample_splits(pools, n_train=1000, n_dev=100, n_test=1000, seed=0, source="test")
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (150, 100, 56)
    assert not {r["idx"] for r in splits.train} & {r["idx"] for r in splits.dev}


def test_sst2_prompt_matches_mezo_template_literally():
    template = PromptTemplate(load_task_definition("sst2"))
    example = template.render({"sentence": "a gentle, clever film ", "label": 1, "idx": 0})
    assert example.prompt == "a gentle, clever film It was"
    assert example.candidates == [" terrible", " great"]
    assert example.gold == [1]


def test_template_naming_a_missing_field_is_a_clear_error():
    template = PromptTemplate({**load_task_definition("sst2"), "prompt": "{{ sentense }} It was"})
    with pytest.raises(ZobenchError, match="sentense"):
        template.render({"sentence": "x", "label": 0})
