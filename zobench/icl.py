"""In-context learning: k demonstrations from the task's whole train split before each dev/test prompt (`icl.k`).

MeZO (large_models/utils.py encode_prompt, tasks.py sample_train_sets; ICL row of Table 1 with k=32):
- a demonstration is the example with its gold answer, `verbalize(demo, gold).strip()`; the demonstrations
  are joined by the task's separator "\\n\\n" and the block is stripped;
- the scored text is `(demonstrations + "\\n\\n" + prompt_with_candidate).lstrip().strip(" ")`; the
  candidate's tokens are still counted on the prompt without demonstrations (the encoder does that);
- every evaluated example has its own demonstrations: example i draws seed_i from
  RandomState(seed).randint(0, 10000, n) and takes the first k of that seed's permutation of the pool.
The pool is MeZO's: the task's whole train split (tasks.py sample_train_sets -> sample_subset over
self.samples["train"], e.g. WSC's 554 rows), not the run's 1,000-example training sample. MeZO seeds the
draw with 0 (`temp_seed(0)`); zobench with data.seed, 0 by default, so test example i gets the
demonstrations MeZO gives it. Only the drawn rows are rendered (a train split can hold 100k rows).
Over-long prompts lose demonstrations from the left (the encoder's left truncation).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

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


def demonstration_blocks(pool: Sequence[Any], count: int, k: int, seed: int,
                         render: Callable[[Any], Example] | None = None) -> list[str]:
    """One block of k demonstrations for each of `count` evaluated examples, in order.

    `pool` holds Examples, or rows that `render` turns into Examples (rendered once each, when drawn).
    """
    texts: dict[int, str] = {}

    def text(index: int) -> str:
        if index not in texts:
            row = pool[index]
            texts[index] = demonstration(render(row) if render is not None else row)
        return texts[index]

    seeds = np.random.RandomState(seed).randint(0, 10000, count)  # MeZO tasks.py sample_train_sets
    blocks = []
    for example_seed in seeds:  # MeZO tasks.py sample_subset: the first k of the seed's permutation
        chosen = np.random.RandomState(int(example_seed)).permutation(len(pool))[:k]
        blocks.append(SEPARATOR.join(text(int(i)) for i in chosen).strip())
    return blocks
