"""ICL demonstrations come from the task's whole train split, drawn as MeZO draws them (tasks.py
sample_train_sets / sample_subset: per evaluated example a seed from the global RNG seeded 0, then the first
k of that seed's permutation of the train split)."""

from __future__ import annotations

import json

import numpy as np

import zobench.build as build
from zobench.spec import RunSpec
from zobench.run import run
from zobench.data import sample_task
from zobench.icl import demonstration, demonstration_blocks
from zobench.tasks import PromptTemplate, load_task_definition

WORDS = ["bright", "slow", "warm", "cold", "sharp", "dull", "kind", "grim"]


def _sst2_folder(tmp_path, n_train: int = 40, n_test: int = 6):
    """A local SST-2-shaped folder (invented sentences) with a train split larger than the run's sample."""
    for split, n in (("train", n_train), ("validation", n_test)):
        rows = [{"sentence": f"{split} review {i} , {WORDS[i % len(WORDS)]} and {WORDS[(3 * i) % 8]} ",
                 "label": i % 2} for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _mezo_draw(pool_size: int, count: int, k: int) -> list[list[int]]:
    """MeZO's own calls: `with temp_seed(0): np.random.randint(0, 10000, n)`, then per seed
    `np.random.seed(seed); np.random.permutation(len(train))[:k]` on the global RNG."""
    state = np.random.get_state()
    try:
        np.random.seed(0)
        seeds = np.random.randint(0, 10000, count)
        draws = []
        for seed in seeds:
            np.random.seed(seed)
            draws.append(np.random.permutation(pool_size).tolist()[:k])
        return draws
    finally:
        np.random.set_state(state)


def test_blocks_are_mezos_draw_and_render_only_the_drawn_rows():
    pool = [{"sentence": f"row {i}", "label": i % 2} for i in range(50)]
    template = PromptTemplate(load_task_definition("sst2"))
    rendered = []

    def render(row):
        rendered.append(row["sentence"])
        return template.render(row)

    blocks = demonstration_blocks(pool, count=7, k=3, seed=0, render=render)
    draws = _mezo_draw(50, 7, 3)
    assert blocks == ["\n\n".join(demonstration(template.render(pool[i])) for i in draw) for draw in draws]
    assert sorted(rendered) == sorted({f"row {i}" for draw in draws for i in draw})  # each drawn row once


def test_a_run_draws_from_the_whole_train_split(quick_cfg, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    folder = _sst2_folder(tmp_path / "data")
    seen = {}

    def spy(pool, count, k, seed, render=None):
        blocks = demonstration_blocks(pool, count, k, seed, render)
        seen.update(pool=[row["sentence"] for row in pool], blocks=blocks, count=count)
        return blocks

    monkeypatch.setattr(build, "demonstration_blocks", spy)
    cfg = quick_cfg("optimizer=zero_shot", "icl.k=3", f"task.data_dir={folder}", "task.samples=false",
                    "data.n_train=4", "data.n_dev=2", "data.n_test=6", "max_length=512")
    metrics = run(cfg, tmp_path / "run")
    assert metrics["status"] == "completed" and metrics["icl_pool"] == 40
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert seen["pool"] == [row["sentence"] for row in rows]  # the whole split, in its own order
    template = PromptTemplate(load_task_definition("sst2"))
    assert seen["blocks"] == ["\n\n".join(demonstration(template.render(rows[i])) for i in draw)
                              for draw in _mezo_draw(40, seen["count"], 3)]
    task = load_task_definition("sst2") | {"data_dir": str(folder)}
    sample = {row["sentence"] for row in sample_task(task, RunSpec.from_cfg(cfg).data).train}
    drawn = {rows[i]["sentence"] for draw in _mezo_draw(40, seen["count"], 3) for i in draw}
    assert drawn - sample  # demonstrations reach rows outside the run's training sample
