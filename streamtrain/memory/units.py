"""Byte sizes as people write them: '24GB' is 24 * 10^9 bytes, '24GiB' is 24 * 2^30.

Decimal (KB, MB, GB, TB) and binary (KiB, MiB, GiB, TiB) units, case-insensitive, with an optional
space and a non-negative number ('22.5GiB', '24000 mb'). A bare unit-less number is refused: a
budget of '24' is almost certainly a mistake, and guessing its unit would hide it.
"""
import re

UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
ACCEPTED = "a number and a unit, e.g. 24GB (10^9 bytes), 24GiB (2^30), 24000MB, 22.5GiB"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*$", re.IGNORECASE)


def parse_bytes(text) -> int:
    """'24GB' -> 24_000_000_000; ValueError naming the string and the accepted forms otherwise."""
    match = _SIZE.match(text) if isinstance(text, str) else None
    unit = match and match.group(2).lower()
    if not match or unit not in UNITS:
        raise ValueError(f"cannot read the size {text!r}; write {ACCEPTED} (also KB/KiB/MB/MiB/TB/TiB)")
    size = round(float(match.group(1)) * UNITS[unit])
    if size <= 0:
        raise ValueError(f"the size {text!r} is zero; write a positive size such as 24GB")
    return size


def format_bytes(n: float) -> str:
    """Both conventions, so nobody has to convert: '24.00 GB (22.35 GiB)'."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for decimal, binary, factor in (("GB", "GiB", 30), ("MB", "MiB", 20), ("KB", "KiB", 10)):
        if n >= 10 ** (factor // 10 * 3) or factor == 10:
            return (f"{sign}{n / 10 ** (factor // 10 * 3):.2f} {decimal} "
                    f"({sign}{n / 2 ** factor:.2f} {binary})")


def gb(n: float) -> str:
    """Compact decimal gigabytes for tables: '13.48'."""
    return f"{n / 1e9:.2f}"
