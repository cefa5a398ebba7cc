"""Task definitions: one YAML file per task in tasks/, rendered per example with Jinja templates.

A task file says where the data comes from (`hub`, `splits`), which columns it needs, how one row
becomes a prompt and its answer candidates, which candidates are correct (`gold`), the metric, and
whether training uses classification over the candidates. tasks/ is the only list of tasks: the
Hydra `task` group is built from it (zobench/configs.py).

Template fields:
  prompt      a Jinja template rendered with the row's columns            -> str
  candidates  a list of Jinja templates (one per label), or one Jinja
              expression that evaluates to a list of strings              -> list[str]
  gold        a Jinja expression: a candidate index, a list of them, or
              the text(s) of the correct candidate(s) / answers           -> see `Example.gold`

Besides Jinja's own filters (trim, lower, replace, ...), templates may use the few MeZO-specific
filters defined below (boolq_question, copa_premise, copa_choice, record_passage, record_options).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2 import meta, nodes

from .errors import Interrupted, ZobenchError
from .paths import tasks_dir
from .render_budget import RENDER_CHARS, RENDER_SECONDS, BudgetedSandbox, OverBudget, budget

# Keys every task has; a task file may override any of them. data_dir/samples pick the data source.
TASK_DEFAULTS: dict[str, Any] = {
    "kind": "classification",  # classification | multiple_choice | generation
    "splits": {"train": "train", "test": "validation"},
    "sizes": {},  # per-task caps on n_train / n_dev / n_test (e.g. CB's small splits)
    "metric": "accuracy",
    "train_as_classification": False,
    "data_dir": None,  # a local folder with the dataset's split files
    "samples": False,  # true: the small hand-written samples shipped in tasks/samples/
}
REQUIRED_KEYS = ("name", "hub", "columns", "prompt", "gold")
KINDS = ("classification", "multiple_choice", "generation")


def task_files() -> dict[str, Path]:
    return {path.stem: path for path in sorted(tasks_dir().glob("*.yaml"))}


def task_names() -> list[str]:
    return list(task_files())


def load_task_definition(name: str) -> dict[str, Any]:
    """The task's file merged over TASK_DEFAULTS, checked for the keys the runner needs."""
    files = task_files()
    if name not in files:
        raise ZobenchError(f"unknown task '{name}'; valid tasks: {', '.join(files)}")
    with open(files[name]) as handle:
        definition = yaml.safe_load(handle) or {}
    missing = [key for key in REQUIRED_KEYS if key not in definition]
    if missing:
        raise ZobenchError(f"task file {files[name]} lacks the key(s): {', '.join(missing)}")
    if definition.get("kind", "classification") not in KINDS:
        raise ZobenchError(f"task file {files[name]}: kind must be one of {', '.join(KINDS)}")
    return {**TASK_DEFAULTS, **definition}


@dataclass
class Example:
    """One row rendered by the task's template.

    For candidate tasks `gold` holds the indices of the correct candidates; for generation tasks
    it holds the gold answer texts (the metric takes the best match over them).
    """

    prompt: str
    candidates: list[str]
    gold: list[Any] = field(default_factory=list)


class TemplateOverBudget(ZobenchError):
    """A task template that took too long or built too much rendering one example (zobench/render_budget.py)."""


class BadValue(ZobenchError):
    """A row's value the task cannot use; zobench/data_checks.py adds the file, row and column."""

    def __init__(self, message: str, column: str | None = None, gold: bool = False):
        super().__init__(message)
        self.column, self.gold = column, gold  # gold: about the gold answer, not a printed text


def _printable(value: Any) -> Any:
    """Jinja's `finalize`: what a {{ ... }} prints must be text (or a number), never None or a list,
    which would otherwise reach the prompt as "None" or "['a', 'b']"."""
    if value is None:
        raise BadValue("null where the template prints text")
    if isinstance(value, (list, tuple, dict)):
        kind = type(value).__name__
        raise BadValue(f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} where the template prints text: {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# Jinja's sandbox: a task template (from tasks/, a `task.prompt=` override, or a copied run folder's
# overrides) may not reach Python internals (`cycler.__init__.__globals__.os`): that raises SecurityError.
# Immutable: a template cannot change a row's lists or dicts either. Budgeted (zobench/render_budget.py):
# rendering one example may take RENDER_SECONDS and make texts of RENDER_CHARS at most, so a template
# cannot hang a run or fill its memory.
_ENV = BudgetedSandbox(
    undefined=jinja2.StrictUndefined,  # a misspelt column is an error, not an empty string
    keep_trailing_newline=True,  # MeZO's templates end in "\n" for several tasks
    autoescape=False,
    finalize=_printable,
)


# Filters for the few MeZO templates (princeton-nlp/MeZO large_models/templates.py) that do more than
# insert columns. Each mirrors one line of MeZO's code so the rendered text matches it character for character.
def boolq_question(question: str) -> str:
    """BoolQTemplateV3: end the question with "?" and upper-case its first character."""
    if not question.endswith("?"):
        question += "?"
    return question[:1].upper() + question[1:]


def copa_premise(premise: str) -> str:
    """CopaTemplate.get_prompt: the premise without trailing spaces and without one final "."."""
    premise = premise.rstrip()
    return premise[:-1] if premise.endswith(".") else premise


def copa_choice(choice: str) -> str:
    """CopaTemplate.capitalize ("correct"): lower-case the first word unless it is "I"."""
    words = choice.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


def record_passage(passage: str) -> str:
    """ReCoRDTemplateGPT3: the passage's "@highlight\\n" markers become "- " bullets."""
    return passage.replace("@highlight\n", "- ")


def record_options(entities, query: str) -> list[str]:
    """ReCoRDTemplateGPT3: what verbalize adds to encode's "...\\n-" for each entity: " " and the
    query with @placeholder replaced by the entity (the whole filled query is the scored option)."""
    return [" " + query.replace("@placeholder", entity) for entity in entities]


_ENV.add_filters(boolq_question=boolq_question, copa_premise=copa_premise, copa_choice=copa_choice,
                 record_passage=record_passage, record_options=record_options)


class PromptTemplate:
    """Compiles a task's prompt / candidates / gold once; renders rows into Examples."""

    def __init__(self, task: dict[str, Any]):
        self.name = task["name"]
        self.kind = task["kind"]
        try:
            self._prompt = _ENV.from_string(task["prompt"])
            spec = task.get("candidates")
            if isinstance(spec, str):
                self._candidate_list = _ENV.compile_expression(spec)
                self._candidate_templates = None
            else:
                self._candidate_list = None
                self._candidate_templates = [_ENV.from_string(t) for t in (spec or [])]
            self._gold = _ENV.compile_expression(str(task["gold"]))
        except jinja2.TemplateSyntaxError as error:
            raise ZobenchError(f"task '{self.name}': bad template ({error})") from error
        except jinja2.exceptions.SecurityError as error:
            raise _unsafe(self.name, error) from error
        if self.kind != "generation" and not spec:
            raise ZobenchError(f"task '{self.name}' is of kind {self.kind} but has no candidates")
        templates = [task["prompt"]] + ([] if isinstance(spec, str) else list(spec or []))
        # columns printed as they are ({{ col }}, {{ col | filter }}): each row must hold text there
        self.text_columns = sorted(set().union(*(_printed_names(t) for t in templates)))
        # columns the gold expression reads: a null there is a missing label, whatever the expression
        self.gold_columns = sorted(meta.find_undeclared_variables(_ENV.parse("{{ " + str(task["gold"]) + " }}")))
        expressions = [str(task["gold"])] + ([spec] if isinstance(spec, str) else [])
        sources = templates + ["{{ " + e + " }}" for e in expressions]
        self.variables = sorted(set().union(*(meta.find_undeclared_variables(_ENV.parse(t)) for t in sources)))

    def render(self, row: dict[str, Any]) -> Example:
        key = "prompt"  # the template key being rendered, named if it goes over its budget
        try:
            with budget():
                prompt = self._prompt.render(**row)
                key = "gold"
                gold = self._gold(**row)
                if self.kind == "generation":  # the answers first: the training target is one of them
                    gold = self._gold_list(gold, [])
                key = "candidates"
                if self._candidate_templates is not None:
                    candidates = []
                    for index, template in enumerate(self._candidate_templates):
                        key = f"candidates[{index}]"
                        candidates.append(template.render(**row))
                else:
                    candidates = self._listed_candidates(row)
        except OverBudget as error:
            raise TemplateOverBudget(f"task '{self.name}': the template task.{key} {error}, over the budget of "
                                     f"{RENDER_SECONDS:g} s and {RENDER_CHARS:,} characters per example; simplify "
                                     f"the template") from None
        except jinja2.exceptions.SecurityError as error:
            raise _unsafe(self.name, error) from error
        except jinja2.UndefinedError as error:
            raise ZobenchError(f"task '{self.name}': template needs a field the data lacks ({error})") from error
        return Example(prompt, candidates, gold if self.kind == "generation" else self._gold_list(gold, candidates))

    def check_budget(self) -> None:
        """Render a row of placeholder texts: a template over its budget whatever the data holds is refused
        before any data is read (one that is over it only on some rows: by the data checks, naming the row)."""
        try:
            self.render({name: "text" for name in self.variables})
        except (TemplateOverBudget, Interrupted):
            raise
        except Exception:  # placeholders are not real values: what they break says nothing
            pass

    def _listed_candidates(self, row: dict[str, Any]) -> list[str]:
        listed = self._candidate_list(**row)
        if not isinstance(listed, (list, tuple)) or not listed:
            raise BadValue(f"the candidates expression gave {_short(listed)}, not a non-empty list")
        bad = [c for c in listed if not isinstance(c, str) or not c.strip()]
        if bad:
            raise BadValue(f"candidate {_short(bad[0])} is not text")
        return list(listed)

    def _gold_list(self, gold: Any, candidates: list[str]) -> list[Any]:
        """The gold answer texts (generation) or candidate indices; a label no candidate matches, out of
        range, fractional or missing is refused here, not scored as a silent 0."""
        values = list(gold) if isinstance(gold, (list, tuple)) else [gold]
        if self.kind == "generation":
            texts = [v for v in values if isinstance(v, str) and v.strip()]
            if not values or len(texts) != len(values):
                raise BadValue(f"gold answers must be a non-empty list of texts, got {_short(gold)}", gold=True)
            return texts
        indices = [index for value in values for index in self._candidate_indices(value, candidates)]
        if not indices:
            raise BadValue(f"label {_short(gold)} matches no candidate ({', '.join(map(repr, candidates))}); "
                           f"give the candidate's index (0..{len(candidates) - 1}) or its text", gold=True)
        return indices

    def _candidate_indices(self, value: Any, candidates: list[str]) -> list[int]:
        """An index in range, or every candidate whose text the value is (none: no such candidate)."""
        if value is None:
            raise BadValue("null label", gold=True)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            digits = value.strip().lstrip("-")
            if len(digits) > 18:  # no task has that many candidates (and int() refuses 4300+ digits)
                raise BadValue(f"label of {len(digits)} digits is out of range: the task has {len(candidates)} "
                               f"candidates (0..{len(candidates) - 1})", gold=True)
            value = int(value)
        if isinstance(value, float):
            if not value.is_integer():
                raise BadValue(f"label {value} is not a whole number (a candidate index)", gold=True)
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(candidates):
                if abs(value) >= 10**18:  # printed whole, a long number would fill the line (or exceed int->str)
                    value = f"of {value.bit_length() * 3 // 10}+ digits"
                raise BadValue(f"label {value} is out of range: the task has {len(candidates)} candidates "
                               f"(0..{len(candidates) - 1})", gold=True)
            return [value]
        if isinstance(value, str):
            return [i for i, c in enumerate(candidates) if c.strip() == value.strip()]
        raise BadValue(f"label {_short(value)} is neither a candidate index nor a candidate's text", gold=True)


def _unsafe(task_name: str, error: Exception) -> ZobenchError:
    return ZobenchError(f"task '{task_name}': the template tries something unsafe, refused by Jinja's sandbox "
                        f"({error}); templates may use the row's columns, filters and plain expressions only")


def _printed_names(source: str) -> set[str]:
    """Names printed directly by a template's {{ ... }}, through filters or not (`{{ sentence | trim }}`)."""
    names = set()
    for output in _ENV.parse(source).find_all(nodes.Output):
        for node in output.nodes:
            while isinstance(node, nodes.Filter) and node.node is not None:
                node = node.node
            if isinstance(node, nodes.Name):
                names.add(node.name)
    return names
