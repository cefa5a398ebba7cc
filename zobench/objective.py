"""The training loss and candidate log-likelihoods, with forward/backward/token counters.

Losses follow MeZO (large_models/utils.py forward_wrap_with_option_len), op for op in the loss dtype:
  classification  cross-entropy over the candidates' mean token log-probs (train_as_classification); each
                  candidate's sum as MeZO's `.sum(-1)`: accumulated in fp32, rounded once
  lm              teacher-forced NLL of the correct candidate's tokens: CrossEntropyLoss's mean over those tokens,
                  through the same reduction (nll_loss) over the same positions, so it rounds as MeZO's does
In fp32 (zobench's default loss dtype) the one rounding is no rounding: the same rule serves every mode.
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
    def __init__(self, model, counter: PassCounter | None = None, loss_dtype: torch.dtype = torch.float32,
                 forward: torch.nn.Module | None = None):
        self.model = model
        # `forward`: the module whose call runs the whole model under torchrun (FSDP2's root, DDP's wrapper;
        # zobench/parallel): its hooks gather the shards and reduce the gradients, which calling the body and
        # the head apart would bypass, so the split below is off
        self._forward = forward if forward is not None else model
        # the dtype the log-probs (and so the loss) are computed in: fp32 (zobench), or the weights' dtype as
        # MeZO/ZO-Bench do (utils.py: log_softmax of fp16 logits); see zobench/precision.py
        self.loss_dtype = loss_dtype
        self.counter = counter or PassCounter()
        # Logits only where an option token is predicted: the full [N, T, vocab] tensor is never built.
        self._body = getattr(model, "base_model", None)
        self._head = model.get_output_embeddings()
        # The split needs a bare body: a wrapper whose base_model is itself a whole LM (PEFT prefix tuning,
        # whose own forward adds the prefix) runs its full forward.
        if self._body is model or self._head is None or _has_lm_head(self._body) or forward is not None:
            self._body = None

    def option_logprobs(self, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sequence: the sum of its option tokens' log-probs (in the loss dtype), and how many there are."""
        table = self._option_table(batch)
        return _row_sums(table), batch.option_mask[:, 1:].sum(dim=1)

    def _option_table(self, batch: SequenceBatch) -> torch.Tensor:
        """[N, T-1] in the loss dtype: the log-prob of token t+1 at t where it is an option token, else 0
        (MeZO utils.py forward_wrap_with_option_len: `selected_log_probs * mask`)."""
        self.counter.forward_passes += 1
        self.counter.tokens += int(batch.attention_mask.sum())
        target = batch.option_mask[:, 1:]  # token t is predicted at position t-1
        # A model split over devices (model.device_map) ends on its last one, and calling the body and the head
        # apart skips accelerate's alignment: the mask goes to the states' device, the option rows to the head's,
        # the targets to the logits', and the table comes back to the batch's device.
        if self._body is not None:
            hidden = self._body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            rows = hidden[:, :-1][target.to(hidden.device)]
            logits = self._head(rows.to(next(self._head.parameters()).device))
        else:
            output = self._forward(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            logits = output.logits[:, :-1][target.to(output.logits.device)]
        tokens = batch.input_ids[:, 1:][target].to(logits.device)
        # log_softmax is row by row, so the option rows alone give MeZO's values; masked_scatter places them
        # (deterministic, unlike index_add on CUDA)
        token_logprobs = -F.cross_entropy(logits.to(self.loss_dtype), tokens, reduction="none")
        table = torch.zeros(target.shape, dtype=token_logprobs.dtype, device=target.device)
        return table.masked_scatter(target, token_logprobs.to(target.device))

    def final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[N, T, hidden]: the states the LM head reads (linear probing's features); one counted forward."""
        self.counter.forward_passes += 1
        self.counter.tokens += int(attention_mask.sum())
        if self._body is not None:
            return self._body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        seen = {}
        handle = self._head.register_forward_hook(lambda module, args, output: seen.setdefault("hidden", args[0]))
        try:
            self._forward(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            handle.remove()
        return seen["hidden"]

    def loss(self, batch: SequenceBatch) -> torch.Tensor:
        if batch.classification:
            loss = loss_from_logprobs(batch, *self.option_logprobs(batch))
        else:  # MeZO's reduction needs each option token's position, not the per-sequence sums
            loss = lm_loss(self._option_table(batch), batch.option_mask[:, 1:])
        return self.counting_backward(loss)

    def counting_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss`, a backward pass through it counted (also a loss built from loss_parts: parallel/zo.py)."""
        if loss.requires_grad:
            loss.register_hook(self._count_backward)
        return loss

    def loss_parts(self, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(numerator, denominator), loss = numerator / denominator, each a sum over the batch's examples, so
        that the parts of slices of a batch add up to the whole batch's (parallel.zo=data adds them over
        ranks): classification: the per-example cross-entropies' sum (in float64) and the example count;
        lm: the option tokens' NLL sum and their count."""
        if batch.classification:
            sums, counts = self.option_logprobs(batch)
            scores = candidate_scores(batch, sums, counts, "mean")  # -inf where an example has fewer candidates
            numerator = F.cross_entropy(scores, batch.gold, reduction="none").double().sum()
        else:
            numerator = -self._option_table(batch).double().sum()
        return numerator, torch.tensor(float(loss_terms(batch)), dtype=torch.float64, device=numerator.device)

    def _count_backward(self, grad):
        self.counter.backward_passes += 1
        return grad

    __call__ = loss


def loss_terms(batch: SequenceBatch) -> int:
    """How many terms the training loss averages: examples (classification), else option tokens (lm)."""
    return batch.num_examples if batch.classification else int(batch.option_mask[:, 1:].sum())


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


def _row_sums(table: torch.Tensor) -> torch.Tensor:
    """Each row's sum, as MeZO's `.sum(-1)` of 16-bit log-probs: torch accumulates 16-bit sums in fp32
    and rounds once (CPU and CUDA), so this is the fp32 sum rounded once to the loss dtype in every mode."""
    return table.sum(dim=-1)


def lm_loss(table: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MeZO's LM loss (utils.py: CrossEntropyLoss(ignore_index=-100) over the shifted [N*(T-1), vocab] logits,
    mean over the option tokens), through the same reduction kernel over the same positions: its rounding in
    16-bit (a half-precision cascade on CPU, an fp32 total on CUDA) is the kernel's, and so is MeZO's."""
    labels = torch.where(target, 0, -100).reshape(-1)
    return F.nll_loss(table.reshape(-1, 1), labels, ignore_index=-100)


def loss_from_logprobs(batch: SequenceBatch, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    if not batch.classification:
        return -sums.sum() / counts.sum().clamp(min=1)
    scores = candidate_scores(batch, sums, counts, "mean")
    sizes = torch.bincount(batch.example_index, minlength=batch.num_examples)
    if bool((sizes == sizes[0]).all()):  # MeZO: one CrossEntropyLoss (mean) over [bsz, num_options]
        return F.cross_entropy(scores, batch.gold)
    # MeZO utils.py, options of different counts: one loss per example, added up in order, then / count
    loss = 0
    for i, size in enumerate(sizes.tolist()):
        loss = F.cross_entropy(scores[i: i + 1, :size], batch.gold[i: i + 1]) + loss
    return loss / len(sizes)
