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

from .errors import ZobenchError
from .paths import tasks_dir

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


_ENV = jinja2.Environment(
    undefined=jinja2.StrictUndefined,  # a misspelt column is an error, not an empty string
    keep_trailing_newline=True,  # MeZO's templates end in "\n" for several tasks
    autoescape=False,
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


_ENV.filters.update(boolq_question=boolq_question, copa_premise=copa_premise, copa_choice=copa_choice,
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
        if self.kind != "generation" and not spec:
            raise ZobenchError(f"task '{self.name}' is of kind {self.kind} but has no candidates")

    def render(self, row: dict[str, Any]) -> Example:
        try:
            prompt = self._prompt.render(**row)
            if self._candidate_templates is not None:
                candidates = [t.render(**row) for t in self._candidate_templates]
            else:
                candidates = [str(c) for c in self._candidate_list(**row)]
            gold = self._gold(**row)
        except jinja2.UndefinedError as error:
            raise ZobenchError(f"task '{self.name}': template needs a field the data lacks ({error})") from error
        return Example(prompt, candidates, self._gold_list(gold, candidates))

    def _gold_list(self, gold: Any, candidates: list[str]) -> list[Any]:
        values = list(gold) if isinstance(gold, (list, tuple)) else [gold]
        if self.kind == "generation":
            return [str(v) for v in values]
        indices = []
        for value in values:
            if isinstance(value, str) and not value.lstrip("-").isdigit():
                indices += [i for i, c in enumerate(candidates) if c.strip() == value.strip()]
            else:
                indices.append(int(value))
        return indices
