"""The eleven MeZO tasks: templates rendered literally as MeZO's, hub-schema data, a run each, F1/EM, truncation."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from zobench.byte_tokenizer import byte_tokenizer
from zobench.configs import compose
from zobench.data import load_split_pools, sample_splits
from zobench.encoding import Encoder
from zobench.metrics import exact_match, generation_metrics, token_f1
from zobench.models import bos_override
from zobench.paths import tasks_dir
from zobench.run import run
from zobench.tasks import Example, PromptTemplate, load_task_definition, task_names

# name: (metric, kind, train_as_classification) as MeZO runs it (mezo.sh, tasks.py metric_name)
TASKS = {
    "sst2": ("accuracy", "classification", True),
    "rte": ("accuracy", "classification", True),
    "cb": ("accuracy", "classification", True),
    "boolq": ("accuracy", "classification", True),
    "wsc": ("accuracy", "classification", True),
    "wic": ("accuracy", "classification", True),
    "multirc": ("accuracy", "classification", True),
    "copa": ("accuracy", "multiple_choice", False),
    "record": ("accuracy", "multiple_choice", False),
    "squad": ("f1", "generation", False),
    "drop": ("f1", "generation", False),
}

# The hub's columns, in the hub's order, with the nesting of the structured ones.
HUB_COLUMNS = {
    "sst2": ["sentence", "label", "idx"],
    "rte": ["premise", "hypothesis", "idx", "label"],
    "cb": ["premise", "hypothesis", "idx", "label"],
    "boolq": ["question", "answer", "passage"],
    "wsc": ["text", "span1_index", "span2_index", "span1_text", "span2_text", "idx", "label"],
    "wic": ["word", "sentence1", "sentence2", "start1", "start2", "end1", "end2", "idx", "label"],
    "multirc": ["paragraph", "question", "answer", "idx", "label"],
    "copa": ["premise", "choice1", "choice2", "question", "idx", "label"],
    "record": ["passage", "query", "entities", "entity_spans", "answers", "idx"],
    "squad": ["id", "title", "context", "question", "answers"],
    "drop": ["section_id", "query_id", "passage", "question", "answers_spans"],
}
NESTED = {
    ("multirc", "idx"): ["paragraph", "question", "answer"],
    ("record", "entity_spans"): ["text", "start", "end"],
    ("record", "idx"): ["passage", "query"],
    ("squad", "answers"): ["text", "answer_start"],
    ("drop", "answers_spans"): ["spans", "types"],
}

# One row per task and the text MeZO's template gives it (large_models/templates.py): the prompt is
# encode(row); each candidate is verbalize(row, c) minus encode(row). Typed out by hand on purpose.
LITERAL = {
    "sst2": ({"sentence": " a patient , generous film ", "label": 1, "idx": 0},
             "a patient , generous film It was", [" terrible", " great"], [1]),
    "rte": ({"premise": "The ferry left at noon.", "hypothesis": "The ferry left.", "idx": 0, "label": 0},
            'The ferry left at noon.\nDoes this mean that "The ferry left." is true? Yes or No?\n', ["Yes", "No"], [0]),
    "cb": ({"premise": "A: Is it late? B: I think it is late.", "hypothesis": "it is late", "idx": 0, "label": 2},
           'Suppose A: Is it late? B: I think it is late. Can we infer that "it is late"? Yes, No, or Maybe?\n',
           ["Yes", "No", "Maybe"], [2]),
    "boolq": ({"question": "is the moat still full of water", "answer": False, "passage": "The moat was drained in 1920."},
              "The moat was drained in 1920. Is the moat still full of water?\n", ["Yes", "No"], [1]),
    "wsc": ({"text": "Ana called Bo because She was late.", "span1_index": 0, "span2_index": 4, "span1_text": "Ana",
             "span2_text": "She", "idx": 0, "label": 1},
            'Ana called Bo because She was late.\nIn the previous sentence, does the pronoun "she" refer to Ana? '
            "Yes or No?\n", ["No", "Yes"], [1]),
    "wic": ({"word": "bark", "sentence1": "The bark was rough.", "sentence2": "A loud bark.", "start1": 4,
             "start2": 7, "end1": 8, "end2": 11, "idx": 0, "label": 0},
            'Does the word "bark" have the same meaning in these two sentences? Yes, No?\nThe bark was rough.\n'
            "A loud bark.\n", ["No", "Yes"], [0]),
    "multirc": ({"paragraph": "Sent 1: Lia sold the boat.", "question": "What did Lia sell?", "answer": "A boat",
                 "idx": {"paragraph": 0, "question": 0, "answer": 0}, "label": 1},
                'Sent 1: Lia sold the boat.\nQuestion: What did Lia sell?\nI found this answer "A boat". '
                "Is that correct? Yes or No?\n", ["No", "Yes"], [1]),
    # COPA: the premise loses its final "." (and trailing spaces); a choice's first word is lower-cased unless "I".
    "copa": ({"premise": "The kettle whistled. ", "choice1": "The water boiled.", "choice2": "I was asleep.",
              "question": "cause", "idx": 0, "label": 0},
             "The kettle whistled because ", ["the water boiled.", "I was asleep."], [0]),
    # ReCoRD: "@highlight\n" becomes "- "; each option is " " + the query with the entity filled in.
    "record": ({"passage": "Ava Lund won in Oslo.\n@highlight\nLund wins\n@highlight\nA first for Oslo",
                "query": "@placeholder took the title.", "entities": ["Ava Lund", "Lund", "Oslo"],
                "entity_spans": {"text": ["Ava Lund", "Oslo", "Lund", "Oslo"], "start": [0, 16, 33, 58],
                                 "end": [8, 20, 37, 62]},
                "answers": ["Ava Lund", "Lund"], "idx": {"passage": 0, "query": 0}},
               "Ava Lund won in Oslo.\n- Lund wins\n- A first for Oslo\n-",
               [" Ava Lund took the title.", " Lund took the title.", " Oslo took the title."], [0, 1]),
    # Generation: the single candidate is the teacher-forced target; gold holds every answer text.
    "squad": ({"id": "q1", "title": "Kelby", "context": "Kelby was built in 1788.", "question": " When was Kelby built? ",
               "answers": {"text": ["1788", "in 1788"], "answer_start": [19, 16]}},
              "Title: Kelby\nContext: Kelby was built in 1788.\nQuestion: When was Kelby built?\nAnswer:",
              [" 1788\n"], ["1788", "in 1788"]),
    "drop": ({"section_id": "s1", "query_id": "q1", "passage": "Ten ships came; four sank.",
              "question": "How many ships did not sink? ", "answers_spans": {"spans": ["6", "six"], "types": ["number", "number"]}},
             "Passage: Ten ships came; four sank.\nQuestion: How many ships did not sink?\nAnswer:", [" 6\n"], ["6", "six"]),
}


def _sample_rows(name: str, split: str) -> list[dict]:
    with open(tasks_dir() / "samples" / name / f"{split}.jsonl") as handle:
        return [json.loads(line) for line in handle]


def test_tasks_folder_holds_exactly_the_eleven_tasks():
    assert sorted(task_names()) == sorted(TASKS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_file_follows_mezo_settings(name):
    task = load_task_definition(name)
    metric, kind, classification = TASKS[name]
    assert (task["metric"], task["kind"], task["train_as_classification"]) == (metric, kind, classification)
    assert task["splits"] == {"train": "train", "test": "validation"}  # test labels hidden: test on validation
    assert task["sizes"] == ({"n_dev": 100} if name in ("cb", "copa") else {})  # MeZO's DEV=100 for CB, COPA


@pytest.mark.parametrize("name", sorted(LITERAL))
def test_prompt_and_candidates_match_the_mezo_template_literally(name):
    row, prompt, candidates, gold = LITERAL[name]
    example = PromptTemplate(load_task_definition(name)).render(row)
    assert example.prompt == prompt
    assert example.candidates == candidates
    assert example.gold == gold


def test_encoder_strips_the_prompt_space_like_mezo_and_scores_the_candidate_tokens():
    """COPA's encode ends in a space that MeZO strips; the option is then " the water boiled."."""
    row, prompt, candidates, _ = LITERAL["copa"]
    tokenizer = byte_tokenizer()
    encoded = Encoder(tokenizer, 256).encode(PromptTemplate(load_task_definition("copa")).render(row))
    assert tokenizer.decode(encoded.prompt_ids, skip_special_tokens=True) == prompt.rstrip(" ")
    option = encoded.sequences[0][-encoded.option_lens[0]:]
    assert tokenizer.decode(option) == " the water boiled."


@pytest.mark.parametrize("name", sorted(TASKS))
def test_samples_are_in_the_hub_schema(name):
    for split, size in (("train", 24), ("validation", 12)):
        rows = _sample_rows(name, split)
        assert len(rows) == size
        for row in rows:
            assert list(row) == HUB_COLUMNS[name]
            for (task, column), keys in NESTED.items():
                if task == name:
                    assert list(row[column]) == keys


@pytest.mark.parametrize("name", sorted(TASKS))
def test_data_dir_reads_hub_schema_parquet_files(name, tmp_path):
    """The samples written as the hub's parquet files (nested columns as Arrow structs) read back the same."""
    import datasets

    for split in ("train", "validation"):
        datasets.Dataset.from_list(_sample_rows(name, split)).to_parquet(str(tmp_path / f"{split}.parquet"))
    task = {**load_task_definition(name), "data_dir": str(tmp_path)}
    pools, source = load_split_pools(task)
    assert str(tmp_path) in source and (len(pools["train"]), len(pools["test"])) == (24, 12)
    template = PromptTemplate(task)
    from_parquet = template.render(pools["test"][0])
    from_jsonl = template.render(_sample_rows(name, "validation")[0])
    assert from_parquet == from_jsonl
    assert from_parquet.gold and len(from_parquet.candidates) >= 1


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tiny_model_trains_and_evaluates_every_task(name, quick_cfg, tmp_path):
    metrics = run(quick_cfg(f"task={name}", "train.steps=2", "max_length=512"), tmp_path)
    metric = TASKS[name][0]
    assert metrics["status"] == "completed" and metrics["task"] == name
    assert metrics["metric"] == metric and 0.0 <= metrics["test_metric"] <= 1.0
    expected_scores = {"f1", "em"} if metric == "f1" else {"accuracy"}
    assert set(metrics["test_scores"]) == expected_scores
    assert (metrics["n_train"], metrics["n_dev"], metrics["n_test"]) == (16, 8, 12)
    assert metrics["steps"] == 2 and metrics["dev_metric"] is not None
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["metric"] == metric and on_disk["test_metric"] == metrics["test_metric"]


def test_unknown_task_lists_all_eleven(tmp_path):
    result = run_cli("task=nope", f"results_dir={tmp_path}")
    assert result.returncode == 2
    assert f"valid: {', '.join(sorted(TASKS))}" in result.stderr


# -- F1 / exact match on hand-made cases (SQuAD v1.1 normalisation, as MeZO's metrics.py) ------------
def test_articles_punctuation_case_and_spaces_are_ignored():
    assert exact_match("The  Eiffel Tower!", "eiffel tower") == 1.0
    assert token_f1("an apple.", "Apple") == 1.0
    assert exact_match("a theory", "theory") == 1.0  # "a" goes, "theory" (which contains "the") stays


def test_partial_overlap_is_token_f1():
    # {big, red, barn} vs {red, barn, door}: 2 common, precision = recall = 2/3
    assert token_f1("the big red barn", "red barn door") == pytest.approx(2 / 3)
    assert exact_match("the big red barn", "red barn door") == 0.0
    # precision 1, recall 2/3 -> F1 0.8
    assert token_f1("blue sky", "blue sky today") == pytest.approx(0.8)


def test_several_gold_answers_take_the_best():
    scores = generation_metrics(["Paris"], [["London", "paris.", "the city of Paris"]])
    assert scores == {"f1": 1.0, "em": 1.0}
    scores = generation_metrics(["city of Paris"], [["London", "the city of Paris, France"]])
    assert scores["em"] == 0.0 and scores["f1"] == pytest.approx(2 * 1 * 0.75 / 1.75)


def test_empty_prediction_scores_zero_and_scores_average_over_examples():
    assert token_f1("", "1788") == 0.0 and exact_match("", "1788") == 0.0
    scores = generation_metrics(["blue sky", ""], [["blue sky today"], ["1788"]])
    assert scores["f1"] == pytest.approx((0.8 + 0.0) / 2) and scores["em"] == 0.0


# -- left truncation of long inputs ----------------------------------------------------------------------
def test_long_prompt_is_cut_from_the_left_and_the_answer_survives():
    tokenizer = byte_tokenizer()
    encoder = Encoder(tokenizer, max_length=32)
    example = Example(prompt="word " * 40 + "It was", candidates=[" great", " terrible"], gold=[0])
    encoded = encoder.encode(example)
    assert encoded.truncated
    for sequence, option_len, candidate in zip(encoded.sequences, encoded.option_lens, example.candidates):
        assert len(sequence) == 32 and sequence[0] == tokenizer.bos_token_id  # BOS kept, the left of the text cut
        assert tokenizer.decode(sequence[-option_len:]) == candidate
        assert tokenizer.decode(sequence, skip_special_tokens=True).endswith("word It was" + candidate)
    # Generation keeps room for the new tokens: the prompt alone is cut to max_length - room.
    assert len(encoder.encode(example, generation_room=10).prompt_ids) == 22
    assert not Encoder(tokenizer, max_length=1024).encode(example).truncated


def test_opt_presets_start_prompts_with_mezos_bos_id():
    tokenizer = byte_tokenizer()
    example = Example(prompt="word " * 40 + "It was", candidates=[" great", " terrible"], gold=[0])
    plain = Encoder(tokenizer, max_length=32).encode(example)
    mezo = Encoder(tokenizer, max_length=32, bos_id=0).encode(example)
    assert tokenizer.bos_token_id != 0 and plain.sequences[0][0] == tokenizer.bos_token_id
    assert mezo.prompt_ids[0] == 0 and all(seq[0] == 0 for seq in mezo.sequences)  # also when cut from the left
    assert [seq[1:] for seq in mezo.sequences] == [seq[1:] for seq in plain.sequences]
    assert mezo.option_lens == plain.option_lens and mezo.prompt_ids[1:] == plain.prompt_ids[1:]
    # MeZO's run.py sets it for OPT only, and never for the byte tokenizer (another vocabulary)
    for name in ("opt-125m", "opt-13b", "opt-66b"):
        spec = OmegaConf.to_container(compose([f"model={name}"]).model, resolve=True)
        assert bos_override(spec) == 0, name
        assert bos_override({**spec, "tokenizer": "byte"}) is None
    for name in ("opt-tiny", "llama-7b"):
        assert bos_override(OmegaConf.to_container(compose([f"model={name}"]).model, resolve=True)) is None


def test_truncated_counts_per_split_land_in_metrics_json(quick_cfg, tmp_path):
    max_length = 180  # between the shortest and the longest RTE sample
    cfg = quick_cfg("task=rte", "train.steps=1", f"max_length={max_length}")
    metrics = run(cfg, tmp_path)
    task = load_task_definition("rte") | {"samples": True}
    pools, source = load_split_pools(task)
    splits = sample_splits(pools, n_train=16, n_dev=8, n_test=12, seed=int(cfg.data.seed), source=source)
    template, tokenizer = PromptTemplate(task), byte_tokenizer()

    def too_long(row):
        example = template.render(row)
        return any(len(tokenizer(example.prompt + c)["input_ids"]) > max_length for c in example.candidates)

    expected = {name: sum(map(too_long, getattr(splits, name))) for name in ("train", "dev", "test")}
    assert 0 < sum(expected.values()) < 36  # some cut, some not: the count means something
    assert metrics["truncated"] == expected
    assert json.loads((tmp_path / "metrics.json").read_text())["truncated"] == expected


def test_a_gold_text_names_every_candidate_with_that_text():
    """A label given as text marks each candidate that reads so (an entity listed twice stays gold twice)."""
    task = {**load_task_definition("sst2"), "prompt": "{{ sentence }}", "candidates": "options",
            "gold": "answer"}
    example = PromptTemplate(task).render({"sentence": "s", "options": ["a", "b", "a"], "answer": "a"})
    assert example.gold == [0, 2]
