"""The state's Jalali time stamps (``1403/05/01 12:10 doshanbe``, local time)
back to POSIX time, for the metrics' last-refresh gauge.

The Jalali calendar here is the astronomical one, as the core writes it, via
the 33-year-cycle breaks of Borkowski's algorithm (valid for years -61..3177).
"""

from __future__ import annotations

import datetime as dt
import re

# The Jalali years where the leap-year pattern of the 33-year cycle breaks.
_BREAKS: tuple[int, ...] = (
    *(-61, 9, 38, 199, 426, 686, 756, 818, 1111, 1181, 1210),
    *(1635, 2060, 2097, 2192, 2262, 2324, 2394, 2456, 3178),
)
_STAMP = re.compile(r"^(\d{4})/(\d{2})/(\d{2}) (\d{2}):(\d{2})\b")


def _nowruz(jy: int) -> dt.date:
    """The Gregorian date of the first day (Farvardin 1) of Jalali year ``jy``."""
    if not _BREAKS[0] <= jy < _BREAKS[-1]:
        raise ValueError(f"Jalali year {jy} is out of range")
    leap_j, jp, jump = -14, _BREAKS[0], 0
    for jm in _BREAKS[1:]:
        jump = jm - jp
        if jy < jm:
            break
        leap_j += jump // 33 * 8 + jump % 33 // 4
        jp = jm
    n = jy - jp
    leap_j += n // 33 * 8 + (n % 33 + 3) // 4
    if jump % 33 == 4 and jump - n == 4:
        leap_j += 1
    gy = jy + 621
    leap_g = gy // 4 - (gy // 100 + 1) * 3 // 4 - 150
    return dt.date(gy, 3, 20 + leap_j - leap_g)


def to_gregorian(jy: int, jm: int, jd: int) -> dt.date:
    """Jalali (year, month, day) to a Gregorian date."""
    if not (1 <= jm <= 12 and 1 <= jd <= (31 if jm <= 6 else 30)):
        raise ValueError(f"no Jalali date {jy:04}/{jm:02}/{jd:02}")
    # Months 1-6 have 31 days, 7-11 have 30 (12 has 29 or 30).
    offset = (jm - 1) * 31 - (jm // 7) * (jm - 7) + jd - 1
    return _nowruz(jy) + dt.timedelta(days=offset)


def to_timestamp(stamp: str | None) -> float | None:
    """POSIX time of a state time stamp (local time, minute precision), or None."""
    match = _STAMP.match(stamp or "")
    if not match:
        return None
    jy, jm, jd, hh, mm = (int(g) for g in match.groups())
    try:
        day = to_gregorian(jy, jm, jd)
        return dt.datetime(day.year, day.month, day.day, hh, mm).timestamp()
    except ValueError:
        return None
