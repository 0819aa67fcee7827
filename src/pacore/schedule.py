"""Schedules: how many parallel trajectories each coordinated round runs.

A schedule ``K = [K1, ..., KR]`` lists the coordinated rounds only; a final
round with exactly one trajectory is always appended by the engine, so
``Schedule([4])`` makes 4 + 1 calls. The empty schedule is a plain single call
(pass-through).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pacore.errors import ScheduleError, shorten

PRESETS: dict[str, tuple[int, ...]] = {
    "low": (4,),
    "medium": (16,),
    "high": (32, 4),
    "off": (),
}

# A sanity bound, not a policy: servers enforce their own, smaller caps.
MAX_TRAJECTORIES_PER_ROUND = 100_000

# ASCII digits only, so the canonical text() form is what users typed.
_INT = re.compile(r"[+]?[0-9]+")
_MAX_DIGITS = len(str(MAX_TRAJECTORIES_PER_ROUND))
#: Items of a list schedule shown in an error about it.
_ECHO_ITEMS = 12
_HINT = "give a preset (low, medium, high, off), a count like 4, or counts like 32,4"


@dataclass(frozen=True, slots=True)
class Schedule:
    """An immutable, validated K-vector. Build one with :meth:`parse`."""

    rounds: tuple[int, ...]

    def __post_init__(self) -> None:
        for k in self.rounds:
            if isinstance(k, bool) or not isinstance(k, int):
                raise ScheduleError(f"schedule entries must be whole numbers, got {k!r}")
            if k < 1:
                raise ScheduleError(f"schedule entries must be at least 1, got {k}")
            if k > MAX_TRAJECTORIES_PER_ROUND:
                raise ScheduleError(f"schedule entry {k} exceeds the limit of {MAX_TRAJECTORIES_PER_ROUND} per round")

    @classmethod
    def parse(cls, value: Schedule | str | int | Iterable[int] | None) -> Schedule:
        """Accept a preset name, ``"32,4"``, ``"[32, 4]"``, an int or a sequence."""
        if value is None:
            return cls(PRESETS["low"])
        if isinstance(value, Schedule):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls((value,))
        if isinstance(value, str):
            return cls(_parse_text(value))
        # bytes and mappings are iterable but never a list of counts.
        if isinstance(value, (bool, bytes, bytearray, Mapping)):
            raise ScheduleError(f"invalid schedule {shorten(repr(value))}: {_HINT}")
        try:
            items = list(value)
        except TypeError:
            raise ScheduleError(f"invalid schedule {shorten(repr(value))}: {_HINT}") from None
        # The echo is built once, from a bounded prefix: linear in the list, whatever its length.
        whole = shorten(str(items[:_ECHO_ITEMS]))
        return cls(tuple(_coerce_int(item, whole) for item in items))

    @property
    def ks(self) -> tuple[int, ...]:
        """Every round's trajectory count, the final single-trajectory round included."""
        return (*self.rounds, 1)

    @property
    def total_calls(self) -> int:
        return sum(self.ks)

    @property
    def is_passthrough(self) -> bool:
        return not self.rounds

    def name(self) -> str:
        for preset, ks in PRESETS.items():
            if ks == self.rounds:
                return preset
        return self.text()

    def text(self) -> str:
        """The canonical comma form, ``"32,4"`` (``"off"`` when empty)."""
        return ",".join(map(str, self.rounds)) if self.rounds else "off"

    def __str__(self) -> str:
        return self.text()

    def as_list(self) -> list[int]:
        return list(self.rounds)


def _parse_text(text: str) -> tuple[int, ...]:
    raw = text.strip()
    if not raw:
        raise ScheduleError(f"empty schedule: {_HINT}")
    preset = PRESETS.get(raw.lower())
    if preset is not None:
        return preset
    body = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    if not body.strip():
        return ()
    whole = shorten(raw)
    return tuple(_coerce_int(part, whole) for part in body.split(","))


def _coerce_int(item: object, whole: str) -> int:
    if isinstance(item, bool):
        raise ScheduleError(f"invalid schedule {whole!r}: {item!r} is not a count")
    if isinstance(item, int):
        return item
    part = str(item).strip()
    if not part:
        raise ScheduleError(f"invalid schedule {whole!r}: empty entry between commas")
    if part.startswith("-") and _INT.fullmatch(part[1:]):
        raise ScheduleError(f"invalid schedule {whole!r}: counts must be at least 1, got {shorten(part)}")
    if part.lower() in PRESETS:
        raise ScheduleError(f"invalid schedule {whole!r}: a preset name cannot be mixed with counts")
    if not _INT.fullmatch(part):
        raise ScheduleError(f"invalid schedule {whole!r}: {shorten(part)!r} is not a count; {_HINT}")
    digits = part.lstrip("+").lstrip("0")
    if len(digits) > _MAX_DIGITS:
        # Checked before int(): Python refuses to convert very long digit strings.
        raise ScheduleError(
            f"invalid schedule {whole!r}: a {len(digits)}-digit count exceeds the limit of "
            f"{MAX_TRAJECTORIES_PER_ROUND} per round"
        )
    return int(part)
