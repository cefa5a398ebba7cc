"""Evaluation: candidate scoring (argmax of log-likelihood) or greedy generation, plus the dev loss.

The dev loss (which picks the kept checkpoint with train.select_by=loss) is averaged as MeZO's HF Trainer
(transformers 4.28 Trainer.evaluation_loop, reached through MeZO trainer.py's _maybe_log_save_evaluate) does:
each batch's loss (classification: the mean over its examples; teacher forcing: the mean over all its
answer tokens) repeated once per example, then the mean over the examples. With eval.batch_size = MeZO's
per_device_eval_batch_size (8) the value is MeZO's `eval_loss`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .encoding import EncodedExample, collate
from .metrics import accuracy, generation_metrics
from .objective import Objective, candidate_scores, loss_from_logprobs
from .peft_adapters import generate
from .progress import Counted

MAX_NEW_TOKENS = 50  # MeZO run.py: greedy, at most 50 new tokens, stop at a newline


def evaluate(objective: Objective, examples: Sequence[EncodedExample], *, kind: str, metric: str,
             tokenizer, classification: bool, batch_size: int, score: str = "mean",
             device=None) -> dict[str, Any]:
    """Returns {"metric": value of the task's metric, "loss": the training loss on these examples, ...}."""
    if not examples:
        return {"metric": None, "loss": None}
    model = objective.model
    was_training = model.training
    model.eval()
    try:
        # a bar on a terminal, a line every ~30 s in a log (600 test examples can take minutes)
        with torch.inference_mode(), Counted("evaluating", len(examples), "example") as progress:
            if kind == "generation":
                result = _generation(objective, examples, tokenizer, batch_size, device, progress)
            else:
                result = _candidates(objective, examples, tokenizer, classification, batch_size, score, device,
                                     progress)
    finally:
        model.train(was_training)
    result["metric"] = result[metric]
    return result


def _candidates(objective, examples, tokenizer, classification, batch_size, score, device, progress):
    predictions, losses, weights = [], [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start: start + batch_size]
        batch = collate(chunk, tokenizer.pad_token_id, classification=True).to(device)
        sums, counts = objective.option_logprobs(batch)
        predictions += candidate_scores(batch, sums, counts, score).argmax(dim=1).tolist()
        if classification:
            losses.append(float(loss_from_logprobs(batch, sums, counts)))
        else:  # teacher-forced loss of the correct candidates only, averaged over the batch's tokens
            gold_rows = batch.candidate_index == batch.gold[batch.example_index]
            losses.append(-float(sums[gold_rows].sum()) / max(int(counts[gold_rows].sum()), 1))
        weights.append(len(chunk))
        progress.update(len(chunk))
    return {"accuracy": accuracy(predictions, [e.gold for e in examples]), "loss": example_mean(losses, weights),
            "predictions": predictions}


def _generation(objective, examples, tokenizer, batch_size, device, progress):
    model = objective.model
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    stop_ids = [newline] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    predictions, losses, weights = [], [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start: start + batch_size]
        batch = collate(chunk, tokenizer.pad_token_id, classification=False).to(device)
        sums, counts = objective.option_logprobs(batch)
        losses.append(-float(sums.sum()) / max(int(counts.sum()), 1))  # the batch's mean over its answer tokens
        weights.append(len(chunk))
        width = max(len(e.prompt_ids) for e in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, example in enumerate(chunk):  # left padding: generation continues every row at the end
            input_ids[row, width - len(example.prompt_ids):] = torch.tensor(example.prompt_ids)
            attention[row, width - len(example.prompt_ids):] = 1
        new_tokens = generate(model, input_ids=input_ids.to(device), attention_mask=attention.to(device),
                              do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS,
                              eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        objective.counter.forward_passes += int(new_tokens.shape[1])
        objective.counter.tokens += int(attention.sum()) + int((new_tokens != tokenizer.pad_token_id).sum())
        predictions += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        progress.update(len(chunk))
    scores = generation_metrics(predictions, [e.gold for e in examples])
    return {**scores, "loss": example_mean(losses, weights), "predictions": predictions}


def example_mean(batch_losses: Sequence[float], batch_sizes: Sequence[int]) -> float:
    """HF Trainer's eval loss: each batch's loss counted once per example of the batch."""
    return sum(l * n for l, n in zip(batch_losses, batch_sizes)) / max(sum(batch_sizes), 1)
