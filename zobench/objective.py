"""The training loss and candidate log-likelihoods, with forward/backward/token counters.

Losses follow MeZO (large_models/utils.py forward_wrap_with_option_len):
  classification  cross-entropy over the candidates' mean token log-probs (train_as_classification)
  lm              teacher-forced NLL of the correct candidate's tokens, averaged over those tokens
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .encoding import SequenceBatch


@dataclass
class PassCounter:
    forward_passes: int = 0
    backward_passes: int = 0
    tokens: int = 0


class Objective:
    def __init__(self, model, counter: PassCounter | None = None, loss_dtype: torch.dtype = torch.float32):
        self.model = model
        # the dtype the log-probs (and so the loss) are computed in: fp32 (zobench), or the weights' dtype as
        # MeZO/ZO-Bench do (utils.py: log_softmax of fp16 logits); see zobench/precision.py
        self.loss_dtype = loss_dtype
        self.counter = counter or PassCounter()
        # Logits only where an option token is predicted: the full [N, T, vocab] tensor is never built.
        self._body = getattr(model, "base_model", None)
        self._head = model.get_output_embeddings()
        # The split needs a bare body: a wrapper whose base_model is itself a whole LM (PEFT prefix tuning,
        # whose own forward adds the prefix) runs its full forward.
        if self._body is model or self._head is None or _has_lm_head(self._body):
            self._body = None

    def option_logprobs(self, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sequence: the sum of its option tokens' log-probs, and how many there are."""
        self.counter.forward_passes += 1
        self.counter.tokens += int(batch.attention_mask.sum())
        target = batch.option_mask[:, 1:]  # token t is predicted at position t-1
        if self._body is not None:
            hidden = self._body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            logits = self._head(hidden[:, :-1][target])
        else:
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][target]
        tokens = batch.input_ids[:, 1:][target]
        token_logprobs = -F.cross_entropy(logits.to(self.loss_dtype), tokens, reduction="none")
        rows = torch.nonzero(target, as_tuple=True)[0]
        sums = torch.zeros(target.shape[0], dtype=token_logprobs.dtype, device=token_logprobs.device)
        sums = sums.index_add(0, rows, token_logprobs)
        counts = target.sum(dim=1)
        return sums, counts

    def final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[N, T, hidden]: the states the LM head reads (linear probing's features); one counted forward."""
        self.counter.forward_passes += 1
        self.counter.tokens += int(attention_mask.sum())
        if self._body is not None:
            return self._body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        seen = {}
        handle = self._head.register_forward_hook(lambda module, args, output: seen.setdefault("hidden", args[0]))
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            handle.remove()
        return seen["hidden"]

    def loss(self, batch: SequenceBatch) -> torch.Tensor:
        sums, counts = self.option_logprobs(batch)
        loss = loss_from_logprobs(batch, sums, counts)
        if loss.requires_grad:  # counts a backward pass when one runs through this loss
            loss.register_hook(self._count_backward)
        return loss

    def _count_backward(self, grad):
        self.counter.backward_passes += 1
        return grad

    __call__ = loss


def _has_lm_head(module) -> bool:
    heads = getattr(module, "get_output_embeddings", None)
    return callable(heads) and heads() is not None


def candidate_scores(batch: SequenceBatch, sums: torch.Tensor, counts: torch.Tensor, how: str = "mean"):
    """[B, C_max] scores (-inf where an example has fewer candidates): mean (MeZO) or sum log-prob."""
    values = sums / counts.clamp(min=1) if how == "mean" else sums
    width = int(batch.candidate_index.max()) + 1
    table = torch.full((batch.num_examples, width), float("-inf"), dtype=values.dtype, device=values.device)
    table[batch.example_index, batch.candidate_index] = values
    return table


def loss_from_logprobs(batch: SequenceBatch, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    if batch.classification:
        return F.cross_entropy(candidate_scores(batch, sums, counts, "mean"), batch.gold)
    return -sums.sum() / counts.sum().clamp(min=1)
