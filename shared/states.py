"""The life of a detection: explicit states, and the transitions allowed between them.

received -> extracting -> fusing -> assigned | new | review
any non-terminal state -> failed (dead-lettered, or no progress after max attempts)
Terminal states are only left by a human decision (review, merge, split, reassign).
"""
from __future__ import annotations

RECEIVED, EXTRACTING, FUSING = "received", "extracting", "fusing"
ASSIGNED, NEW, REVIEW, FAILED = "assigned", "new", "review", "failed"

STATES = (RECEIVED, EXTRACTING, FUSING, ASSIGNED, NEW, REVIEW, FAILED)
PENDING = frozenset({RECEIVED, EXTRACTING, FUSING})
TERMINAL = frozenset({ASSIGNED, NEW, REVIEW, FAILED})

_MACHINE_TRANSITIONS = {
    RECEIVED: {EXTRACTING, FUSING, ASSIGNED, NEW, REVIEW, FAILED},
    EXTRACTING: {FUSING, ASSIGNED, NEW, REVIEW, FAILED},
    FUSING: {ASSIGNED, NEW, REVIEW, FAILED},
}


def is_terminal(state: str) -> bool:
    if state not in STATES:
        raise ValueError(f"unknown detection state {state!r}")
    return state in TERMINAL


def machine_may_move(current: str, target: str) -> bool:
    """Whether the pipeline (not a human) may move a detection from `current` to `target`.

    Moving a terminal detection is never allowed, so a redelivered event changes nothing.
    """
    if current not in STATES or target not in STATES:
        raise ValueError(f"unknown detection state in {current!r} -> {target!r}")
    return target in _MACHINE_TRANSITIONS.get(current, set())
