"""Examples -> token ids (MeZO's rules) -> padded batches.

MeZO (large_models/utils.py encode_prompt): the prompt and each prompt+candidate text are tokenized
standalone (with BOS), both with trailing spaces stripped; the candidate's tokens are the last
len(full) - len(prompt) tokens of the full sequence. Over-long sequences lose tokens from the left,
after the BOS, so the answer part is never cut. OPT presets replace the tokenizer's BOS (</s>, 2) by
id 0, as MeZO's run.py does for OPT ("HF tokenizer bug fix": tokenizer.bos_token_id = 0, with the slow
tokenizer that then prepends 0); `model.bos_token_id=null` keeps the tokenizer's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .icl import with_demonstrations
from .tasks import Example


@dataclass
class EncodedExample:
    sequences: list[list[int]]  # one per candidate: prompt + candidate (for generation: + gold target)
    option_lens: list[int]  # tokens at the end of each sequence that belong to the candidate
    gold: list[Any]  # candidate indices (candidate tasks) or gold answer texts (generation)
    prompt_ids: list[int]  # the prompt alone, for generation
    truncated: bool

    @property
    def train_index(self) -> int:
        """The sequence a teacher-forced loss trains on: the (first) correct candidate."""
        return self.gold[0] if self.gold and isinstance(self.gold[0], int) else 0


class Encoder:
    def __init__(self, tokenizer, max_length: int, bos_id: int | None = None):
        """`bos_id`: an id put in place of the BOS the tokenizer prepends (models.bos_override)."""
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self._tokenizer_bos = tokenizer.bos_token_id
        self.bos = self._tokenizer_bos if bos_id is None else int(bos_id)

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if ids and self.bos != self._tokenizer_bos and ids[0] == self._tokenizer_bos:
            ids[0] = self.bos
        return ids

    def _truncate(self, ids: list[int], limit: int) -> tuple[list[int], bool]:
        if len(ids) <= limit:
            return ids, False
        if self.bos is not None and ids and ids[0] == self.bos:
            return [ids[0]] + ids[len(ids) - (limit - 1):], True
        return ids[len(ids) - limit:], True

    def encode(self, example: Example, generation_room: int = 0, demonstrations: str = "") -> EncodedExample:
        """`demonstrations` (in-context learning, zobench/icl.py) go before the prompt; the candidate's
        length is still measured on the prompt alone, as MeZO does.

        MeZO utils.py encode_prompt (~146-190): the final text is `(demonstrations + "\\n\\n" + text)
        .lstrip().strip(" ")`, so without demonstrations all leading whitespace (newlines too) goes, while
        option lengths are measured on the texts stripped of spaces only. Generation tasks keep room for
        the new tokens: every sequence of theirs (prompt + gold, train/dev/test alike) and every prompt is
        cut to max_length - max_new_tokens (1998 with MeZO's defaults; train/dev through MeZO run.py `_convert`).
        """
        limit = self.max_length - generation_room
        prompt = example.prompt.strip(" ")
        prompt_ids = self._ids(prompt)
        sequences, option_lens, truncated = [], [], False
        for candidate in example.candidates:
            # MeZO strips verbalize(), i.e. the unstripped prompt + candidate (COPA's prompt ends in a space)
            verbalized = (example.prompt + candidate).strip(" ")
            full = self._ids(verbalized)
            option_len = max(len(full) - len(prompt_ids), 1)
            final = with_demonstrations(demonstrations, verbalized)
            if final != verbalized:
                full = self._ids(final)
            full, cut = self._truncate(full, limit)
            sequences.append(full)
            option_lens.append(min(option_len, len(full) - 1))
            truncated |= cut
        final_prompt = with_demonstrations(demonstrations, prompt)
        if final_prompt != prompt:
            prompt_ids = self._ids(final_prompt)
        prompt_ids, cut = self._truncate(prompt_ids, limit)
        return EncodedExample(sequences, option_lens, example.gold, prompt_ids, truncated or cut)


@dataclass
class SequenceBatch:
    """Right-padded sequences; option_mask marks the tokens whose log-probs are scored."""

    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    option_mask: torch.Tensor  # [N, T] bool
    example_index: torch.Tensor  # [N]: which example each sequence belongs to
    candidate_index: torch.Tensor  # [N]: which candidate of its example
    gold: torch.Tensor  # [B]: each example's (first) correct candidate
    classification: bool  # all candidates of each example (True) or only the correct one (False)

    @property
    def num_examples(self) -> int:
        return int(self.gold.shape[0])

    def to(self, device) -> "SequenceBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return SequenceBatch(**moved)


def collate_indices(indices, examples: Sequence[EncodedExample], pad_id: int, classification: bool, device):
    """A step's index list becomes one batch on `device`; a tuple of index lists a tuple of batches (see
    Optimizer.batches)."""
    if isinstance(indices, tuple):
        return tuple(collate_indices(part, examples, pad_id, classification, device) for part in indices)
    return collate([examples[i] for i in indices], pad_id, classification).to(device)


def collate(examples: Sequence[EncodedExample], pad_id: int, classification: bool,
            pad_to_multiple: int = 8) -> SequenceBatch:
    rows, example_index, candidate_index = [], [], []
    for i, example in enumerate(examples):
        chosen = range(len(example.sequences)) if classification else [example.train_index]
        for c in chosen:
            rows.append((example.sequences[c], example.option_lens[c]))
            example_index.append(i)
            candidate_index.append(c)
    width = max(len(ids) for ids, _ in rows)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    option = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (ids, option_len) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention[r, : len(ids)] = 1
        option[r, len(ids) - option_len: len(ids)] = True
    gold = torch.tensor([e.train_index for e in examples], dtype=torch.long)
    return SequenceBatch(input_ids, attention, option, torch.tensor(example_index),
                         torch.tensor(candidate_index), gold, classification)
