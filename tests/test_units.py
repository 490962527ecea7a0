"""Sizes and rates: every flag in the project parses them, so they must be exact and strict."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manifests.units import format_size, parse_rate, parse_size

SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "kB": 1000,
    "M": 1000**2,
    "MB": 1000**2,
    "G": 1000**3,
    "GB": 1000**3,
    "T": 1000**4,
    "TB": 1000**4,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "TiB": 1 << 40,
}
BIT_UNITS = {
    "bit": 1,
    "Kbit": 1000,
    "Mbit": 1000**2,
    "Gbit": 1000**3,
    "Kibit": 1 << 10,
    "Mibit": 1 << 20,
    "Gibit": 1 << 30,
}

counts = st.integers(min_value=0, max_value=10**15)
size_units = st.sampled_from(sorted(SIZE_UNITS))
bit_units = st.sampled_from(sorted(BIT_UNITS))
spaces = st.sampled_from(["", " "])
case = st.sampled_from([str, str.lower, str.upper])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4194304", 4 << 20),
        ("4MiB", 4 << 20),
        ("4mib", 4 << 20),
        (" 4 MiB ", 4 << 20),
        ("512KiB", 512 << 10),
        ("1.5GB", 1_500_000_000),
        ("0.5KiB", 512),
        ("1GiB", 1 << 30),
        ("9007199254740993", 9007199254740993),  # above 2**53: no float rounding
    ],
)
def test_parse_size_examples(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1 << 20),
        ("20MiB", 20 << 20),
        ("20MiB/s", 20 << 20),
        ("20MiBps", 20 << 20),
        ("160Mbit", 20_000_000),
        ("160Mbit/s", 20_000_000),
        ("160mbit", 20_000_000),
        ("160Mbps", 20_000_000),  # network "bps" is bits
        ("1Gbps", 125_000_000),
        ("160MBps", 160_000_000),  # capital B is bytes
        ("8Kibit", 1024),
        ("2.5MB", 2_500_000),
    ],
)
def test_parse_rate_examples(text: str, expected: int) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "abc",
        "-1",
        "+4",
        "1e3",
        "4XB",
        "4 MiBs",
        "MiB",
        "4..5MiB",
        "4MiB4",
        "0x10",
        "4 Mbit",
    ],
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["", "fast", "-20MiB", "20 Mbitz", "1e6", "20MiB/h", "Mbit"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a rate"):
        parse_rate(text)


def test_errors_are_one_line_and_quote_the_input() -> None:
    with pytest.raises(ValueError) as info:
        parse_size("4 bananas")
    assert "\n" not in str(info.value)
    assert "'4 bananas'" in str(info.value)


@given(counts, size_units, spaces, case)
def test_size_round_trip(n: int, unit: str, space: str, casing: object) -> None:
    text = f"{n}{space}{unit}"
    assert callable(casing)
    assert parse_size(casing(text)) == n * SIZE_UNITS[unit]


@given(counts, size_units)
def test_a_rate_in_bytes_is_a_size_per_second(n: int, unit: str) -> None:
    expected = n * SIZE_UNITS[unit]
    assert parse_rate(f"{n}{unit}") == expected
    assert parse_rate(f"{n}{unit}/s") == expected


@given(counts, bit_units, st.sampled_from(["", "/s"]))
def test_bit_rate_round_trip(n: int, unit: str, suffix: str) -> None:
    assert parse_rate(f"{n}{unit}{suffix}") == n * BIT_UNITS[unit] // 8


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=999))
def test_decimal_fractions_are_exact(whole: int, thousandths: int) -> None:
    text = f"{whole}.{thousandths:03d}"
    assert parse_size(text + "KB") == whole * 1000 + thousandths
    assert parse_size(text + "MB") == (whole * 1000 + thousandths) * 1000


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_size_parses_back_within_rounding(n: int) -> None:
    text = format_size(n)
    number, unit = text.split()
    parsed = parse_size(number + unit)
    # One decimal of a unit >= 1: off by at most 0.05 units, i.e. 5% (+ the 0.05 KiB floor).
    assert abs(parsed - n) <= max(1, n * 0.051)


@given(st.text(max_size=12))
def test_garbage_never_crashes_differently(text: str) -> None:
    for parse in (parse_size, parse_rate):
        try:
            value = parse(text)
        except ValueError:
            continue
        assert isinstance(value, int) and value >= 0
