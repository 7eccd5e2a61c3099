"""Byte sizes: ``50_000_000``, ``"50 MiB"``, ``"1.5 GB"`` in; ``"47.7 MiB"`` out."""

from __future__ import annotations

import math
import operator
import re
from typing import NoReturn, SupportsIndex

__all__ = ["format_size", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

# Python's own rules for the digits of a literal: an underscore only between
# two digits ("1_000", not "1__0", "_1", "1_" or "1_.5").
_DIGITS = r"[0-9](?:_?[0-9])*"
_SIZE_RE = re.compile(
    rf"^\s*({_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})\s*([a-zA-Z]*)\s*$"
)


def parse_size(value: object, *, name: str = "size") -> int:
    """Return ``value`` as a whole number of bytes.

    Accepts a non-negative integer (an int, or any integer type that
    ``operator.index`` accepts, such as ``numpy.int64``; not a bool), a
    finite non-negative float (truncated), or a string of a number and an
    optional unit: B, kB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB
    (powers of 1024), case-insensitive.  Underscores may group digits as in
    Python literals (``"1_000_000"``).  Errors name the argument ``name``
    (``"size"`` unless given): ``TypeError`` for a wrong type,
    ``ValueError`` for a bad value.
    """
    # Exact-type fast paths first: a scope parses its limits on every request.
    if value.__class__ is int:
        if 0 <= value <= 0x7FFF_FFFF_FFFF_FFFF:  # _MAX_SIZE, folded
            return value
        if value < 0:
            raise ValueError(f"{name} must not be negative, got {value!r}")
        return _too_large(value, name)
    if value.__class__ is str:
        size = _parsed_text.get(value)
        if size is None:
            size = _parse_size_text(value, name)
            if len(_parsed_text) >= 256:  # bounded: limits are a few strings
                _parsed_text.clear()
            _parsed_text[value] = size
        return size
    if isinstance(value, str):  # a str subclass
        return _parse_size_text(str(value), name)
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a size in bytes (int or str), not bool")
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"{name} must be a finite size, got {value!r}")
        if value < 0:
            raise ValueError(f"{name} must not be negative, got {value!r}")
        return _checked(int(value), value, name)
    size = _integer(value)
    if size is None:
        raise TypeError(
            f"{name} must be a size in bytes (int, or str like '50 MiB'), "
            f"not {type(value).__name__}"
        )
    if size < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return _checked(size, value, name)


def _integer(value: object) -> int | None:
    """``value`` as an int if it is an integer by its own account: an int
    subclass, numpy.int64 and the like (``operator.index``).  Not a bool,
    nor numpy.bool_ (which ``operator.index`` refuses): True is no size."""
    if isinstance(value, bool) or not isinstance(value, SupportsIndex):
        return None
    try:
        return operator.index(value)
    except TypeError:  # an __index__ that refuses, or returns a non-int
        return None


# The meter counts bytes in 64-bit signed integers (8 EiB).
_MAX_SIZE = 2**63 - 1


def _checked(size: int, given: object, name: str) -> int:
    """``size`` (>= 0), parsed from ``given``, if the meter can count it."""
    if size <= _MAX_SIZE:
        return size
    return _too_large(given, name)


def _too_large(given: object, name: str) -> NoReturn:
    raise ValueError(f"{name} must be at most 2**63 - 1 bytes, got {given!r}")


# Scopes are opened with the same few strings, on every request.
_parsed_text: dict[str, int] = {}


def _parse_size_text(text: str, name: str) -> int:
    match = _SIZE_RE.match(text)
    if match is None:
        hint = " (an underscore goes only between two digits)" if "_" in text else ""
        raise ValueError(
            f"{name} must look like '50 MiB', '1.5 GB' or '4096', got {text!r}{hint}"
        )
    digits, unit = match.groups()
    multiplier = _UNITS.get(unit.lower())
    if multiplier is None:
        known = "B, kB, MB, GB, TB, KiB, MiB, GiB, TiB"
        raise ValueError(f"{name} has an unknown unit {unit!r} (known: {known})")
    digits = digits.replace("_", "")
    if "." in digits:
        size = float(digits) * multiplier
        if size > _MAX_SIZE:  # also inf, for hundreds of digits
            _too_large(text, name)
        return int(size)
    if len(digits.lstrip("0")) > 19:  # >= 10**19: too large, and int() of
        _too_large(text, name)  # thousands of digits would refuse on its own
    return _checked(int(digits) * multiplier, text, name)  # exact


def format_size(size: SupportsIndex) -> str:
    """``1536`` -> ``'1.5 KiB'``; binary units, three significant digits."""
    if size.__class__ is not int:
        integer = _integer(size)  # numpy.int64 too, as in parse_size
        if integer is None:
            raise TypeError(f"size must be an int (bytes), not {type(size).__name__}")
        size = integer
    magnitude = abs(size)
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2)):
        if magnitude >= factor:
            return _three_digits(size / factor, unit)
    if magnitude >= 1024:
        return _three_digits(size / 1024, "KiB")
    return f"{size} B"


def _three_digits(value: float, unit: str) -> str:
    text = f"{value:.3g}"
    if "e" in text:  # 999.5 and up: "1e+03 MiB" would not read back
        text = f"{value:.0f}"
    return f"{text} {unit}"
