"""One way to check a number setting, for every validator (ClearConfig, generate and transfer settings,
distillation recipes, command-line options): booleans are not numbers, integers where asked, finite,
within the range; one message form: ``<where> must be <what>, got <value>``."""

from __future__ import annotations

import math
import numbers

from .errors import InvalidValueError


def number_problem(where: str, value, *, integer: bool = False, low: float | None = None, strict: bool = True,
                   high: float | None = None, high_strict: bool = False, optional: bool = False) -> str | None:
    """What is wrong with ``value`` (None: nothing). ``low``/``high``: bounds, ``strict``/``high_strict``:
    excluded; ``optional``: None is allowed (a setting not given)."""
    if value is None and optional:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else numbers.Real):
        return f"{where} must be {kind}, got {value!r}"
    above = low is None or (value > low if strict else value >= low)
    below = high is None or (value < high if high_strict else value <= high)
    if math.isfinite(value) and above and below:
        return None
    if high is None and low is None:
        wanted = "finite"
    elif high is None:
        wanted = f"{'>' if strict else '>='} {low:g}"
    elif low is None:
        wanted = f"{'<' if high_strict else '<='} {high:g}"
    else:
        wanted = f"in {'(' if strict else '['}{low:g}, {high:g}{')' if high_strict else ']'}"
    what = f"an integer {wanted}" if integer else wanted + ("" if wanted == "finite" else " and finite")
    return f"{where} must be {what}, got {value!r}"


def check_number(where: str, value, *, error: type[Exception] = InvalidValueError, **rules) -> None:
    """Raise ``error`` with ``number_problem``'s message when ``value`` breaks ``rules``."""
    problem = number_problem(where, value, **rules)
    if problem is not None:
        raise error(problem)
