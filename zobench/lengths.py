"""`zobench-lengths`: the token-length distribution of a task's sampled training set.

Addax splits each step's examples at a length threshold L_T (short ones get a first-order gradient,
long ones a zeroth-order estimate); L_T is read off this distribution. Overrides compose exactly as
for `zobench`, so the training set is the one a run with the same overrides trains on:

    zobench-lengths task=rte model=opt-13b              # hub data, the model's own tokenizer
    zobench-lengths task=rte model=opt-13b l_t=180      # also: how many examples have <= 180 tokens
    zobench-lengths task.samples=true model=opt-tiny data.n_train=16 data.n_dev=8

An example's length is the one the runner hands the optimizer: the tokens of its longest
prompt + answer sequence (over all candidates; prompt + gold target for generation tasks), after
MeZO's left truncation to max_length. Percentiles are nearest-rank: p90 = the smallest length that
at least 90% of the examples do not exceed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from .errors import ZobenchError

PERCENTILES = (50, 75, 90, 95, 99)


@dataclass
class LengthReport:
    task: str
    model: str
    source: str
    max_length: int
    lengths: list[int]
    truncated: int  # examples cut from the left to max_length
    l_t: int | None = None

    def percentile(self, q: float) -> int:
        return int(np.percentile(self.lengths, q, method="inverted_cdf"))

    @property
    def at_or_under(self) -> int | None:
        return None if self.l_t is None else sum(length <= self.l_t for length in self.lengths)

    def summary(self) -> dict:
        return {"count": len(self.lengths), "min": min(self.lengths),
                **{f"p{q}": self.percentile(q) for q in PERCENTILES}, "max": max(self.lengths),
                "truncated": self.truncated, "l_t": self.l_t, "at_or_under": self.at_or_under}

    def __str__(self) -> str:
        n = len(self.lengths)
        spread = "  ".join(f"p{q} {self.percentile(q)}" for q in PERCENTILES)
        lines = [f"task {self.task}, model {self.model}: {n} training examples from {self.source}",
                 f"tokens per example (prompt + answer, longest candidate; max_length={self.max_length}):",
                 f"  min {min(self.lengths)}  {spread}  max {max(self.lengths)}",
                 f"  truncated from the left: {self.truncated}"]
        if self.l_t is not None:
            lines.append(f"  at or under l_t={self.l_t}: {self.at_or_under} of {n} "
                         f"({100 * self.at_or_under / n:.1f}%); above: {n - self.at_or_under}")
        return "\n".join(lines)


def length_report(cfg, l_t: int | None = None) -> LengthReport:
    """Sample the training set as the runner does, tokenize it with the model preset's tokenizer."""
    from .build import answer_room, encoder, sample_splits
    from .models import load_tokenizer
    from .spec import RunSpec
    from .tasks import PromptTemplate

    spec = RunSpec.from_cfg(cfg)
    task = spec.task
    splits = sample_splits(spec)
    train, source = splits.train, splits.source
    tokenizer = load_tokenizer(dict(spec.model))
    template, encode, room = PromptTemplate(task), encoder(spec, tokenizer), answer_room(task)
    encoded = [encode.encode(template.render(row), room) for row in train]
    return LengthReport(task=task["name"], model=spec.model["name"], source=source, max_length=spec.max_length,
                        lengths=[max(map(len, e.sequences)) for e in encoded],
                        truncated=sum(e.truncated for e in encoded), l_t=l_t)


def _split_arguments(args: list[str]) -> tuple[list[str], int | None]:
    """`l_t=N` (or --l_t=N) is this tool's own argument; everything else is a Hydra override."""
    overrides, l_t = [], None
    for arg in args:
        if arg.startswith(("l_t=", "--l_t=")):
            value = arg.split("=", 1)[1]
            if not value.isdigit():
                raise ZobenchError(f"l_t must be a whole number of tokens, got '{value}'")
            l_t = int(value)
        else:
            overrides.append(arg)
    return overrides, l_t


def main(argv: list[str] | None = None) -> None:
    from .configs import compose
    from .failures import command

    args = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in args):
        print(__doc__)
        return

    def body() -> None:
        overrides, l_t = _split_arguments(args)
        print(length_report(compose(overrides), l_t), flush=True)

    code = command("zobench-lengths", body, refused=(ZobenchError,))  # bad input 2, a file it cannot read 1
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
