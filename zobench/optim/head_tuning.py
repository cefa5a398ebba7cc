"""Head-tuning, `optimizer=head_tuning`: first-order training of the LM head alone (MeZO Table 1's "LP" row
for COPA, ReCoRD, SQuAD and DROP, where a linear probe over candidates does not apply).

MeZO (large_models/run.py Framework.load_model, `--head_tuning`; ht_opt.py; run through finetune.sh, i.e.
`--trainer regular`: HF Trainer's AdamW, linear schedule, batch 8, 5 epochs, best dev checkpoint):
- every parameter is frozen but the head: OPT's `embed_tokens` matrix, which the LM head shares (tied), or,
  with `--untie_emb`, a separate copy in `lm_head`;
- ht_opt.py runs the decoder under `torch.no_grad()`, so the gradient reaches the matrix through the head
  only. With the tie the input embeddings are the same tensor and move with each update: later steps and
  the evaluation read the updated embeddings.
Here the same: the input embeddings' output is detached (no graph through the body: backward costs the head
alone, activation memory stays at inference level), the shared matrix trains through its head use; and
`untie: true` trains a copy of the head while the input embeddings stay as loaded (MeZO's --untie_emb).

Why an optimizer and not an option of `lp`: head-tuning takes steps, evaluates on dev, checkpoints and keeps
the best weights like any trained method, while `lp` is a one-shot fit that never changes the model; and
MeZO's flag applies to any task, classification included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ZobenchError
from ..parallel.sharded_checkpoint import is_sharded
from .first_order import TorchOptimizer


def train_head_only(model: torch.nn.Module, untie: bool) -> torch.nn.Parameter:
    """Freeze all but the LM head's weight (untied from the input embeddings if asked); returns it."""
    if not all(p.requires_grad for p in model.parameters()):
        raise ZobenchError("optimizer=head_tuning trains the LM head of the model as loaded: use peft=none")
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embeddings is None:
        raise ZobenchError(f"optimizer=head_tuning: {type(model).__name__} has no LM head / input embeddings")
    tied = head.weight is embeddings.weight
    if tied and untie and is_sharded(model):  # a new Parameter cannot join FSDP2's shards once they are made
        raise ZobenchError("optimizer.untie=true copies the head, which FSDP2 cannot add to a sharded model: use "
                           "optimizer.untie=false under torchrun, or one process")
    if tied and untie:  # MeZO --untie_emb: the head gets its own copy, the input embeddings stay frozen
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False  # save_pretrained keeps both matrices
        tied = False
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    head.weight.requires_grad_(True)
    if tied:  # MeZO ht_opt.py: the body runs without gradient; the shared matrix learns through the head only
        embeddings.register_forward_hook(lambda module, args, output: output.detach())
    return head.weight


class HeadTuning(TorchOptimizer):
    """A torch optimizer (conf/optimizer/head_tuning.yaml: HF Trainer's AdamW, clipping at 1.0) over the LM head
    alone. 16-bit runs follow finetune.sh's `--fp16` without `--load_float16`: the whole model in fp32 under
    16-bit autocast (HF AMP); master weights for the head alone would leave frozen 16-bit LayerNorms meeting
    the fp32 embedding output (CPU: "mixed dtype")."""

    freezes_after_build = True  # zobench/parallel/first_order.py: not under DDP, which expects every gradient

    @dataclass(frozen=True)
    class Settings(TorchOptimizer.Settings):
        max_grad_norm: float | None  # HF Trainer's default clipping (1.0); precision.grad_clip, when set, wins
        untie: bool  # train a copy of the head, input embeddings frozen (MeZO --untie_emb)

    def clip_of(self, settings) -> float | None:
        return settings.max_grad_norm

    def __init__(self, model, loss_fn, settings, *, seed: int, total_steps: int, precision=None):
        train_head_only(model, untie=settings.untie)
        if precision is not None and precision.half and precision.master_weights and \
                any(p.dtype != torch.float32 for p in model.parameters()):  # under torchrun: fp32 already
            model.float()  # in place: the same Parameter objects, so the tie and the hooks stay
        super().__init__(model, loss_fn, settings, seed=seed, total_steps=total_steps, precision=precision)
