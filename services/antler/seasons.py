"""Antler seasons: which season a photo belongs to, and the casting window.

Bucks grow antlers in summer (in velvet), carry hard antlers through the rut, and cast them in late
winter. A fingerprint is only ever compared with fingerprints of the same season tag: this year's rack
says nothing about last year's. Between the rut season's end and the next season's start a tag
`YYYY-velvet` holds the growing antlers (compared among themselves too: a rack in July resembles the
same rack in August more than any other buck's).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime


@dataclass(frozen=True)
class SeasonCalendar:
    start: tuple[int, int] = (9, 1)  # (month, day) the antler season (hard antlers, the rut) begins
    end: tuple[int, int] = (1, 31)  # (month, day) it ends, in the next year when before `start`
    casting_months: tuple[int, ...] = (2, 3)  # SPEC: Feb-Mar

    @classmethod
    def parse(cls, start: str, end: str, casting_months: list[int] | tuple[int, ...]) -> "SeasonCalendar":
        """From 'MM-DD' strings (e.g. DEER_ANTLER_SEASON_START=09-01) and month numbers."""
        def md(text: str) -> tuple[int, int]:
            month, day = (int(x) for x in text.split("-"))
            date(2001, month, day)  # validates (2001: no 29 February)
            return month, day

        months = tuple(int(m) for m in casting_months)
        if not all(1 <= m <= 12 for m in months):
            raise ValueError(f"casting months must be 1-12, got {months}")
        return cls(md(start), md(end), months)

    def season(self, when: datetime | date) -> str:
        """'2024-rut' for the season that began in 2024, else 'YYYY-velvet' for the months between."""
        d = when.date() if isinstance(when, datetime) else when
        md = (d.month, d.day)
        wraps = self.end < self.start  # the season runs over New Year
        if wraps:
            if md >= self.start:
                return f"{d.year}-rut"
            if md <= self.end:
                return f"{d.year - 1}-rut"
        elif self.start <= md <= self.end:
            return f"{d.year}-rut"
        return f"{d.year}-velvet"

    def casting_window(self, when: datetime | date) -> str | None:
        """'2025-casting' while antlers may be cast (the months between two racks), else None."""
        d = when.date() if isinstance(when, datetime) else when
        return f"{d.year}-casting" if d.month in self.casting_months else None
