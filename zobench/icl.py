"""In-context learning: k demonstrations from the training sample before each dev/test prompt (`icl.k`).

MeZO (large_models/utils.py encode_prompt, tasks.py sample_train_sets; ICL row of Table 1 with k=32):
- a demonstration is the example with its gold answer, `verbalize(demo, gold).strip()`; the demonstrations
  are joined by the task's separator "\\n\\n" and the block is stripped;
- the scored text is `(demonstrations + "\\n\\n" + prompt_with_candidate).lstrip().strip(" ")`; the
  candidate's tokens are still counted on the prompt without demonstrations (the encoder does that);
- every evaluated example has its own demonstrations: example i draws seed_i from
  RandomState(seed).randint(0, 10000, n) and takes the first k of that seed's permutation of the pool.
MeZO draws from the whole train split with seed 0; here the pool is the run's training sample and the
seed is data.seed (0 by default), so test example i gets the demonstrations MeZO's rule gives it over
that pool. Over-long prompts lose demonstrations from the left (the encoder's left truncation).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .tasks import Example

SEPARATOR = "\n\n"  # MeZO tasks.py Dataset.train_sep (every task)


def demonstration(example: Example) -> str:
    """The example verbalized with its (first) gold answer, stripped."""
    gold = example.gold[0] if example.gold and isinstance(example.gold[0], int) else 0  # generation: the target
    return (example.prompt + example.candidates[gold]).strip()


def with_demonstrations(demonstrations: str, text: str) -> str:
    """MeZO's final prompt: the demonstrations, the separator, then the prompt (with or without a candidate)."""
    return (demonstrations + SEPARATOR + text.strip(" ")).lstrip().strip(" ")


def demonstration_blocks(pool: Sequence[Example], count: int, k: int, seed: int) -> list[str]:
    """One block of k demonstrations for each of `count` evaluated examples, in order."""
    texts = [demonstration(example) for example in pool]
    seeds = np.random.RandomState(seed).randint(0, 10000, count)
    blocks = []
    for example_seed in seeds:
        chosen = np.random.RandomState(int(example_seed)).permutation(len(texts))[:k]
        blocks.append(SEPARATOR.join(texts[int(i)] for i in chosen).strip())
    return blocks
