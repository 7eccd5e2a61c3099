"""Byte sizes: ``50_000_000``, ``"50 MiB"``, ``"1.5 GB"`` in; ``"47.7 MiB"`` out."""

from __future__ import annotations

import math
import re

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

_SIZE_RE = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object, *, name: str) -> int:
    """Return ``value`` as a whole number of bytes.

    Accepts a non-negative int, a finite non-negative float (truncated), or a
    string of a number and an optional unit: B, kB/MB/GB/TB (powers of 1000)
    or KiB/MiB/GiB/TiB (powers of 1024), case-insensitive.  Errors name the
    argument: ``TypeError`` for a wrong type, ``ValueError`` for a bad value.
    """
    # Exact-type fast paths first: a scope parses its limits on every request.
    if value.__class__ is int:
        if value >= 0:
            return value
        raise ValueError(f"{name} must not be negative, got {value!r}")
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
    if isinstance(value, int | float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"{name} must be a finite size, got {value!r}")
        if value < 0:
            raise ValueError(f"{name} must not be negative, got {value!r}")
        return int(value)
    raise TypeError(
        f"{name} must be a size in bytes (int, or str like '50 MiB'), "
        f"not {type(value).__name__}"
    )


# Scopes are opened with the same few strings, on every request.
_parsed_text: dict[str, int] = {}


def _parse_size_text(text: str, name: str) -> int:
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(
            f"{name} must look like '50 MiB', '1.5 GB' or '4096', got {text!r}"
        )
    digits, unit = match.groups()
    multiplier = _UNITS.get(unit.lower())
    if multiplier is None:
        known = "B, kB, MB, GB, TB, KiB, MiB, GiB, TiB"
        raise ValueError(f"{name} has an unknown unit {unit!r} (known: {known})")
    digits = digits.replace("_", "")
    if "." in digits:
        return int(float(digits) * multiplier)
    return int(digits) * multiplier  # exact, however large


def format_size(size: int) -> str:
    """``1536`` -> ``'1.5 KiB'``; binary units, three significant digits."""
    magnitude = abs(size)
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2)):
        if magnitude >= factor:
            return f"{size / factor:.3g} {unit}"
    if magnitude >= 1024:
        return f"{size / 1024:.3g} KiB"
    return f"{size} B"
