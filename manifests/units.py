"""Human-friendly sizes and rates, parsed the same way by every command."""

from __future__ import annotations

import os
import re
from decimal import Decimal

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_BIT_UNITS = {
    "bit": 1,
    "kbit": 1000,
    "mbit": 1000**2,
    "gbit": 1000**3,
    "kibit": 1 << 10,
    "mibit": 1 << 20,
    "gibit": 1 << 30,
}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*?)(/s|ps)?\s*$")


def _scale(number: str, multiplier: int) -> int:
    """Exact decimal arithmetic: a plain byte count above 2**53 must not be float-rounded."""
    return int(Decimal(number) * multiplier)


def parse_size(text: str) -> int:
    """Bytes from '4194304', '4MiB', '1.5GB' (decimal and binary units)."""
    m = _PATTERN.match(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (try 4MiB, 512KiB, 1GB or a plain byte count)")
    return _scale(m.group(1), _SIZE_UNITS[unit])


def parse_rate(text: str) -> int:
    """Bytes per second from '20MiB', '160Mbit', '1048576' (per second implied).

    '160Mbps' is megaBITs per second, as on every network spec sheet ('160MBps' is bytes).
    """
    m = _PATTERN.match(text)
    if m is not None:
        unit = m.group(2).lower()
        if m.group(3) == "ps" and m.group(2).endswith("b"):
            unit = unit[:-1] + "bit"
        if unit in _BIT_UNITS:
            return _scale(m.group(1), _BIT_UNITS[unit]) // 8
        if unit in _SIZE_UNITS:
            return _scale(m.group(1), _SIZE_UNITS[unit])
    raise ValueError(f"not a rate: {text!r} (try 20MiB, 160Mbit or a plain bytes-per-second count)")


def format_size(n: float) -> str:
    """Short binary-unit rendering for progress lines and summaries."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


class EnvError(ValueError):
    """An environment variable that cannot be read; one line that names it."""


def env_bool(var: str) -> bool:
    """The boolean environment variable `var` (unset: False), case-insensitively; anything
    but 1/true/yes/on or 0/false/no/off/"" is refused rather than guessed at, so that
    DISTD_NO_P2P=off cannot turn p2p off. Read once, when a CLI builds its parser."""
    value = os.environ.get(var, "")
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise EnvError(
        f"{var}={value!r} is not a boolean: use one of {'/'.join(TRUE_WORDS)} "
        f"or {'/'.join(w for w in FALSE_WORDS if w)}"
    )
