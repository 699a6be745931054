"""What every config dataclass shares: allowed values in the type, and a ``validate`` that checks them.

A numeric field declares its allowed values in its annotation, e.g. ``batch_size: PositiveInt = 4`` or
``t_min: Annotated[float, Range(0, 1)] = 0.02``; a choice is a ``Literal``. :meth:`ConfigNode.validate`
checks every field of a dataclass against its annotation, recurses into nested configs, then runs the
component's own cross-field rules (:meth:`ConfigNode.check`). Errors are :class:`ConfigError` with the
dotted key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from recdreamer_gs.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value or file is wrong; the message says what was expected and what was got."""


@dataclass(frozen=True)
class Range:
    """Allowed values of a number (or of both ends of a ``(min, max)`` pair, which must also be ordered)."""

    lo: Optional[float] = None  # smallest allowed value (None: unbounded)
    hi: Optional[float] = None  # largest allowed value (None: unbounded)
    lo_open: bool = False  # exclude lo itself
    hi_open: bool = False  # exclude hi itself
    text: str = ""  # how messages say the range (default: from the bounds)
    why: str = ""  # a reason added to the message, e.g. "(gsplat culls opacity < 1/255)"

    def allows(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return not (self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)))

    def describe(self) -> str:
        if self.text:
            text = self.text
        elif self.lo is not None and self.hi is not None:
            text = f"a number in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"more than {self.lo:g}" if self.lo_open else f"{self.lo:g} or more"
        elif self.hi is not None:
            text = f"less than {self.hi:g}" if self.hi_open else f"{self.hi:g} or less"
        else:
            text = "a finite number"
        return f"{text} {self.why}" if self.why else text

    def outside(self) -> list[float]:
        """Values this range refuses (for the tests generated from the config tree)."""
        out = [math.nan]
        if self.lo is not None:
            out.append(self.lo if self.lo_open else self.lo - 1)
        if self.hi is not None:
            out.append(self.hi if self.hi_open else self.hi + 1)
        return out


# The ranges most fields need, as annotated types: a field reads `steps: PositiveInt = 300`.
PositiveInt = Annotated[int, Range(1, text="a positive number")]
Count = Annotated[int, Range(0)]  # 0 allowed (often "off")
PositiveFloat = Annotated[float, Range(0, lo_open=True, text="a positive number")]
NonNegativeFloat = Annotated[float, Range(0)]
Finite = Annotated[float, Range()]  # any number but NaN and ±inf
Fraction = Annotated[float, Range(0, 1)]
Seed = Annotated[int, Range(0, 2**63 - 1)]
Elevation = Annotated[float, Range(-89, 89)]  # degrees; the poles would make look-at degenerate


def range_of(tp: Any) -> Optional[Range]:
    """The Range an annotation carries (looking through Optional), or None."""
    if typing.get_origin(tp) is Annotated:
        return next((m for m in typing.get_args(tp)[1:] if isinstance(m, Range)), None)
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return range_of(inner[0]) if len(inner) == 1 else None
    return None


def strip(tp: Any) -> Any:
    """The annotation without Annotated metadata and without Optional."""
    if typing.get_origin(tp) is Annotated:
        return strip(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return strip(inner[0]) if len(inner) == 1 else tp
    return tp


def check_value(key: str, value: Any, tp: Any) -> None:
    """One field against its annotation: Literal choices, ranges of numbers and of (min, max) pairs."""
    if value is None:
        return
    base = strip(tp)
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return
    allowed = range_of(tp)
    if allowed is None:
        return
    if typing.get_origin(base) is tuple:
        lo, hi = value
        if not (allowed.allows(lo) and allowed.allows(hi) and lo <= hi):
            raise ConfigError(f"{key}: expected [min, max] with min <= max, each {allowed.describe()}, "
                              f"got {list(value)}")
    elif not allowed.allows(value):
        raise ConfigError(f"{key}: expected {allowed.describe()}, got {value}")


class ConfigNode:
    """Mixin of the config dataclasses: ``validate`` checks ranges, choices, nested configs and own rules."""

    def validate(self, path: str = "") -> None:
        hints = typing.get_type_hints(type(self), include_extras=True)
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            key = join(path, f.name)
            value = getattr(self, f.name)
            if isinstance(value, ConfigNode):
                value.validate(key)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, ConfigNode):
                        item.validate(f"{key}[{i}]")
            else:
                check_value(key, value, hints[f.name])
        self.check(path)

    def check(self, path: str) -> None:
        """Cross-field rules of this component (override); ``path`` prefixes the keys in messages."""


def join(path: str, name: str) -> str:
    """The dotted key of field ``name`` under ``path``."""
    return f"{path}.{name}" if path else name
