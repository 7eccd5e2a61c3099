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


class _Index:
    """An integer by its own account (``__index__``), like numpy.int64."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def test_integer_types_with_index_are_sizes() -> None:
    assert parse_size(_Index(4096), name="memory") == 4096
    assert format_size(_Index(1536)) == "1.5 KiB"
    with pytest.raises(ValueError, match="memory"):
        parse_size(_Index(-1), name="memory")
    with pytest.raises(ValueError, match="memory"):
        parse_size(_Index(2**63), name="memory")


def test_numpy_integers_are_sizes_and_numpy_bools_are_not() -> None:
    np = pytest.importorskip("numpy")
    for integer in (np.int64, np.int32, np.uint64, np.uint8, np.intp):
        size = parse_size(integer(100), name="memory")
        assert size == 100 and type(size) is int
    assert format_size(np.int64(1536)) == "1.5 KiB"
    assert parse_size(np.array(7), name="memory") == 7  # 0-d, as in range()
    with pytest.raises(ValueError, match="memory"):
        parse_size(np.int64(-1), name="memory")
    with pytest.raises(ValueError, match="memory"):
        parse_size(np.uint64(2**64 - 1), name="memory")
    for flag in (np.True_, np.False_):
        with pytest.raises(TypeError, match="memory"):
            parse_size(flag, name="memory")
        with pytest.raises(TypeError, match="size"):
            format_size(flag)
    with pytest.raises(TypeError, match="memory"):
        parse_size(np.array([5]), name="memory")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1_0", 10),
        ("1_000.5", 1000),
        ("1_0.2_5 KiB", 10496),
        (".2_5 KiB", 256),
        ("5.", 5),
    ],
)
def test_underscores_between_digits_group_them(text: str, expected: int) -> None:
    assert parse_size(text, name="memory") == expected


@pytest.mark.parametrize(
    "text",
    ["1__0", "_1", "1_", "1_ MiB", "1_.5", "1._5", "1.5_", "._5", "_", "1_000__000"],
)
def test_underscores_follow_python_literal_rules(text: str) -> None:
    # float() and int() refuse every one of these too.
    with pytest.raises(ValueError):
        float(text.removesuffix(" MiB"))
    with pytest.raises(ValueError, match=r"allocations.*underscore"):
        parse_size(text, name="allocations")


def test_parse_size_without_a_name() -> None:
    # The public function is called as documented, without naming an
    # argument (issue 17): errors then speak of "size".
    assert parse_size("24 MB") == 24_000_000
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError, match="size"):
        parse_size("24 MBs")
