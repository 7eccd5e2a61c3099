from __future__ import annotations

import math

import pytest

from memlimits_async import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("512 KiB", 512 * 1024),
        ("50 MiB", 50 * 1024**2),
        ("50MiB", 50 * 1024**2),
        ("1.5 GB", 1_500_000_000),
        ("2 gib", 2 * 1024**3),
        ("1 TiB", 1024**4),
        ("10 kB", 10_000),
        ("7 B", 7),
        ("1_000_000", 1_000_000),
        ("  3 MB ", 3_000_000),
        (12.9, 12),
        ("9223372036854775807 B", 2**63 - 1),  # the most the meter can count
    ],
)
def test_parse_size_accepts(text: object, expected: int) -> None:
    assert parse_size(text, name="memory") == expected


@pytest.mark.parametrize(
    "text", ["", "MiB", "fifty MiB", "5 MiBs", "5 Mb/s", "1e6", "-5", "5 5 MiB"]
)
def test_parse_size_rejects_bad_text_naming_the_argument(text: str) -> None:
    with pytest.raises(ValueError, match="memory"):
        parse_size(text, name="memory")


@pytest.mark.parametrize(
    "value",
    [
        -1,
        -0.5,
        math.nan,
        math.inf,
        -math.inf,
        2**63,
        1e19,
        "123456789012345678901234567890 B",
        "8388608 TiB",
        "9" * 400 + ".5",
    ],
)
def test_parse_size_rejects_bad_numbers(value: float) -> None:
    with pytest.raises(ValueError, match="allocations"):
        parse_size(value, name="allocations")


@pytest.mark.parametrize("value", [True, None, b"5 MiB", [5], 1j])
def test_parse_size_rejects_bad_types(value: object) -> None:
    with pytest.raises(TypeError, match="memory"):
        parse_size(value, name="memory")


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (10 * 1024**2, "10 MiB"),
        (3 * 1024**3, "3 GiB"),
        (5 * 1024**4, "5 TiB"),
        (-2048, "-2 KiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


def test_parsed_strings_are_remembered_but_errors_still_name_the_argument() -> None:
    assert (
        parse_size("7 MiB", name="memory")
        == parse_size("7 MiB", name="x")
        == 7 * 1024**2
    )
    for name in ("memory", "allocations"):
        with pytest.raises(ValueError, match=name):
            parse_size("7 parsecs", name=name)


def test_str_and_int_subclasses_are_sizes() -> None:
    class Text(str):
        pass

    class Number(int):
        pass

    assert parse_size(Text("2 KiB"), name="memory") == 2048
    assert parse_size(Number(5), name="memory") == 5
    with pytest.raises(ValueError, match="memory"):
        parse_size(Number(-5), name="memory")
