"""Jinja's sandbox on a budget: rendering one example may take RENDER_SECONDS and build RENDER_CHARS at most.

A task template comes from tasks/, a `task.prompt=` override or a received run folder's overrides.yaml.
The sandbox keeps it away from Python's internals; the budget keeps it from hanging a run
(`{% for i in range(99999) %}{% for j in range(99999) %}…`) or filling its memory (`{{ "x" * 2000000000 }}`).

The clock (started by `budget()` around one example) is read at every loop iteration, every call (functions,
methods, macros, filters) and every piece of output. Sizes are checked before the steps that can build a large
text or list at once (`*`, `**`, `%`, `+`, `~`, str's padding, replace, join and format methods, the
center/indent/slice/format/replace/join filters) and on every text or list a call or the output builds.
A normal template's examples take microseconds: neither limit is near them.
"""

from __future__ import annotations

import functools
import math
import re
import threading
import time
from typing import Any, Callable

from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

RENDER_SECONDS = 1.0  # CPU seconds per example: prompt, candidates and gold together
RENDER_CHARS = 1_000_000  # per text (or list) a template builds; MeZO's longest prompts are ~10k characters

# filters whose numeric arguments set the size of what they build (center(width), indent(width), slice(count))
_SIZE_ARGUMENT_FILTERS = ("center", "indent", "slice")
_PADDING_METHODS = ("ljust", "rjust", "center", "zfill", "expandtabs")
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\d+|\*)?(?:\.(\d+|\*))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*:[^{}]*\{?")

_state = threading.local()


class OverBudget(Exception):
    """Raised inside rendering; zobench/tasks.py names the task and the template key that raised it."""


class budget:
    """One example's rendering (`with budget():`): the clock starts here. A class, not a generator: it is
    entered for every example rendered."""

    __slots__ = ("previous",)

    def __enter__(self) -> None:
        self.previous = getattr(_state, "clock", None)
        _state.clock = [time.monotonic() + RENDER_SECONDS, time.thread_time()]  # [wall deadline, CPU at start]

    def __exit__(self, *exc) -> None:
        _state.clock = self.previous


def _tick() -> None:
    """The wall clock is cheap to read; once past the deadline, the CPU time this thread spent rendering decides,
    so a process that was suspended (Ctrl-Z) or starved by other jobs is not refused for it."""
    clock = getattr(_state, "clock", None)
    if clock is None or time.monotonic() <= clock[0]:
        return
    spent = time.thread_time() - clock[1]
    if spent > RENDER_SECONDS:
        raise OverBudget(f"took more than {RENDER_SECONDS:g} s on one example")
    clock[0] = time.monotonic() + RENDER_SECONDS - spent


def _refuse_size(size: int, what: str = "a text") -> None:
    if size > RENDER_CHARS:
        raise OverBudget(f"would build {what} of {size:,} characters or items")


def _check_built(value: Any) -> None:
    if isinstance(value, (str, list, tuple)):
        _refuse_size(len(value))


def _big_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > RENDER_CHARS


def _check_repeat(sequence: Any, count: Any) -> None:
    # a float count (`"x" * 2e9`) is a TypeError to Python: one that large is named as over the budget
    if isinstance(sequence, (str, list, tuple)) and isinstance(count, (int, float)) and math.isfinite(count):
        _refuse_size(int(len(sequence) * max(count, 0)))


def _check_power(base: Any, exponent: Any) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 and exponent > 0:
        if exponent * math.log2(abs(base)) > 8 * RENDER_CHARS:
            raise OverBudget(f"would compute an integer of about {exponent * math.log10(abs(base)):,.0f} digits")


def _check_format(template: str, args: tuple, kwargs: dict, pattern: re.Pattern) -> None:
    """A width or precision (`%2000000000s`, `{:>2000000000}`) or one taken from the arguments (`*`, `{:{w}}`)."""
    for match in pattern.finditer(template):
        spec = match.group(0)
        for digits in re.findall(r"\d+", spec):
            _refuse_size(int(digits) if len(digits) < 10 else RENDER_CHARS + 1, "a padded text")
        if ("*" in spec or spec.endswith("{")) and any(_big_int(v) for v in (*args, *kwargs.values())):
            raise OverBudget("would pad a text to a width beyond the budget")


def _check_replace(text: Any, old: Any, new: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        count = len(text) + 1 if not old else text.count(old)
        _refuse_size(len(text) + count * (len(new) - len(old)))


def _check_join(separator: Any, items: Any) -> None:
    if isinstance(separator, str) and hasattr(items, "__len__"):
        _refuse_size(len(separator) * len(items))


def _check_str_method(method: Any, args: tuple, kwargs: dict) -> None:
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(owner, str):
        return
    if name in _PADDING_METHODS and any(_big_int(v) for v in (*args, *kwargs.values())):
        raise OverBudget(f"would pad a text with str.{name} beyond the budget")
    if name == "replace" and len(args) >= 2:
        _check_replace(owner, args[0], args[1])
    if name == "join" and args:
        _check_join(owner, args[0])


def _check_filter(name: str, value: Any, args: tuple, kwargs: dict) -> None:
    if name in _SIZE_ARGUMENT_FILTERS and any(_big_int(v) for v in (*args, *kwargs.values())):
        raise OverBudget(f"would build a text or list beyond the budget with the {name} filter")
    if name == "format" and isinstance(value, str):
        _check_format(value, args, kwargs, _PERCENT_SPEC)
    if name == "replace" and len(args) >= 2:
        _check_replace(value, args[0], args[1])
    if name == "join":
        _check_join(args[0] if args else kwargs.get("d", ""), value)


def _budgeted_filter(name: str, function: Callable) -> Callable:
    # Jinja passes the environment or context first to filters marked so (the mark is copied by wraps)
    offset = 1 if hasattr(function, "jinja_pass_arg") else 0

    @functools.wraps(function)
    def budgeted(*args, **kwargs):
        _tick()
        if len(args) > offset:
            _check_filter(name, args[offset], args[offset + 1:], kwargs)
        result = function(*args, **kwargs)
        _check_built(result)
        return result

    return budgeted


def loop_items(iterable):
    """Every {% for %} loop iterates through this: the clock is read at each item."""
    for item in iterable:
        _tick()
        yield item


def joined(*parts) -> str:
    """The `~` operator (Jinja's str_join), size-checked."""
    _tick()
    texts = [str(part) for part in parts]
    _refuse_size(sum(map(len, texts)))
    return "".join(texts)


class _BudgetedNodes(NodeTransformer):
    """Loops and `~` in a parsed template go through loop_items and joined."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = _call("loop_items", [node.iter], node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        return _call("joined", [self.visit(part) for part in node.nodes], node.lineno)


def _call(function: str, args: list, lineno: int) -> nodes.Call:
    return nodes.Call(nodes.ImportedName(f"{__name__}.{function}", lineno=lineno), args, [], None, None,
                      lineno=lineno)


class BudgetedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%", "+"})  # also keeps Jinja from folding them at compile time

    def __init__(self, **options):
        super().__init__(**options)
        self.globals.pop("lipsum", None)  # lipsum(n=10**9): text on demand, nothing a task needs
        self.filters = {name: _budgeted_filter(name, f) for name, f in self.filters.items()}

    def add_filters(self, **filters: Callable) -> None:
        self.filters.update({name: _budgeted_filter(name, f) for name, f in filters.items()})

    def compile(self, source, name=None, filename=None, raw=False, defer_init=False):
        if isinstance(source, str):
            source = self._parse(source, name, filename)
        return super().compile(_BudgetedNodes().visit(source), name, filename, raw, defer_init)

    def concat(self, chunks) -> str:
        """The output (of the template, a macro or a {% set %} block). Each piece is bounded where it is built
        and each loop iteration reads the clock, so the pieces are gathered at C speed, then measured."""
        parts = list(chunks)
        _refuse_size(sum(map(len, parts)))
        return "".join(parts)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "*":
            _check_repeat(left, right)
            _check_repeat(right, left)
        elif operator == "**":
            _check_power(left, right)
        elif operator == "%" and isinstance(left, str):
            _check_format(left, right if isinstance(right, tuple) else (right,), {}, _PERCENT_SPEC)
        elif operator == "+" and hasattr(left, "__len__") and hasattr(right, "__len__"):
            _refuse_size(len(left) + len(right))
        return super().call_binop(context, operator, left, right)

    def format_string(self, s, args, kwargs, format_func=None):
        """str.format and format_map: the sandbox routes them here."""
        _check_format(s, args, kwargs, _BRACE_SPEC)
        return super().format_string(s, args, kwargs, format_func)

    def call(self, context, obj, /, *args, **kwargs):
        _tick()
        _check_str_method(obj, args, kwargs)
        result = super().call(context, obj, *args, **kwargs)
        _check_built(result)
        return result
