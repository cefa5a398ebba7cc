"""MeZO's small evaluation rules: the final prompt's leading whitespace, generation tasks' truncation to
max_length - max_new_tokens, F1 on "no answer" golds, and the dev loss averaged as HF Trainer averages it."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from test_mezo import SAMPLE_ROWS
from zobench.byte_tokenizer import byte_tokenizer
from zobench.encoding import Encoder, collate
from zobench.evaluate import evaluate
from zobench.metrics import generation_metrics
from zobench.models import load_model
from zobench.objective import Objective
from zobench.tasks import Example, PromptTemplate, load_task_definition


def test_leading_whitespace_of_the_final_prompt_is_stripped_newlines_too():
    """utils.py encode_prompt: `(demos + "\\n\\n" + prompt).lstrip().strip(" ")`, also without demonstrations;
    the option length is measured on the texts stripped of spaces only."""
    tokenizer = byte_tokenizer()
    example = Example("\n \tTitle: a\nQuestion: b?\nAnswer:", [" c\n"], ["c"])
    encoded = Encoder(tokenizer, 256).encode(example, generation_room=50)
    assert encoded.sequences == [tokenizer("Title: a\nQuestion: b?\nAnswer: c\n")["input_ids"]]
    assert encoded.prompt_ids == tokenizer("Title: a\nQuestion: b?\nAnswer:")["input_ids"]
    assert encoded.option_lens == [len(" c\n")]


def test_generation_sequences_keep_room_for_the_new_tokens():
    """MeZO truncates every generation-task encoding, training ones with the gold included, to
    max_length - max_new_tokens (utils.py encode_prompt, called with max_new_tokens by run.py's _convert)."""
    tokenizer = byte_tokenizer()
    example = Example("x" * 300 + "\nAnswer:", [" yes\n"], ["yes"])
    generation = Encoder(tokenizer, 120).encode(example, generation_room=50)
    assert [len(s) for s in generation.sequences] == [70] and len(generation.prompt_ids) == 70
    assert generation.sequences[0][0] == tokenizer.bos_token_id and generation.truncated
    assert tokenizer.decode(generation.sequences[0][-generation.option_lens[0]:]) == " yes\n"
    candidates = Encoder(tokenizer, 120).encode(example)  # candidate tasks: no room to keep
    assert [len(s) for s in candidates.sequences] == [120]


@pytest.mark.parametrize("gold", ["CANNOTANSWER", "no answer"])
def test_f1_is_exact_match_on_the_first_gold_when_it_is_no_answer(gold):
    """metrics.py calculate_metric("f1"): gold[0] no-answer -> EM with gold[0] alone; "em" has no exception."""
    assert generation_metrics(["the cat sat"], [[gold, "the cat sat"]]) == {"f1": 0.0, "em": 1.0}
    assert generation_metrics([gold.lower()], [[gold]]) == {"f1": 1.0, "em": 1.0}
    assert generation_metrics(["the cat"], [["a cat sat", gold]])["f1"] == pytest.approx(2 / 3)


def test_dev_loss_is_the_mean_over_examples_of_each_batchs_token_mean(quick_cfg):
    """HF Trainer.evaluation_loop: loss.repeat(batch_size), truncated to the dataset size, then the mean.
    Teacher forcing: each batch's loss is the mean over all its answer tokens."""
    cfg = quick_cfg()
    model, tokenizer = load_model(OmegaConf.to_container(cfg.model, resolve=True), torch.device("cpu"),
                                  torch.float32)
    template, encoder = PromptTemplate(load_task_definition("sst2")), Encoder(tokenizer, 256)
    examples = [encoder.encode(template.render(row)) for row in SAMPLE_ROWS]  # " great" / " terrible": 6 / 9 tokens
    objective = Objective(model)
    result = evaluate(objective, examples, kind="classification", metric="accuracy", tokenizer=tokenizer,
                      classification=False, batch_size=3)
    with torch.inference_mode():
        per_example = [objective.option_logprobs(collate([e], tokenizer.pad_token_id, classification=False))
                       for e in examples]
    expected, batches = 0.0, [per_example[i: i + 3] for i in range(0, len(examples), 3)]
    for batch in batches:
        nll, tokens = -sum(float(s.sum()) for s, _ in batch), sum(int(c.sum()) for _, c in batch)
        expected += len(batch) * nll / tokens
    assert result["loss"] == pytest.approx(expected / len(examples), rel=1e-5)
    overall = -sum(float(s.sum()) for s, _ in per_example) / sum(int(c.sum()) for _, c in per_example)
    assert abs(result["loss"] - overall) > 1e-6  # the token mean over all examples would differ
