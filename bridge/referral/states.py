"""The referral state machine, the same on both sides, driven by steps and packets.

``Task.status`` is the FHIR state and has ONE writer, the receiver (the fulfiller), as in the
UMZH Connect rule: the referrer's copy mirrors the receiver's Task from the packets it gets, so
duplicates, reordering and crossing steps cannot leave the two sides apart. The referrer only
requests, asks to cancel (the receiver confirms or refuses), and records the return as received
(a business status, not a Task status).
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.errors import IllegalTransition


@dataclass(frozen=True)
class Move:
    event: str
    by: str  # referrer | receiver
    sources: tuple[str, ...]
    target: str | None  # Task.status after the move (None: unchanged)
    step: str  # business status after the move


MOVES: dict[str, Move] = {
    m.event: m
    for m in (
        Move("request", "referrer", ("draft",), "requested", "requested"),
        Move("received", "receiver", ("requested",), "received", "received"),
        Move("accept", "receiver", ("requested", "received"), "accepted", "scheduled"),
        Move("reject", "receiver", ("requested", "received"), "rejected", "rejected"),
        Move("arrive", "receiver", ("accepted",), "in-progress", "arrived"),
        Move("cancel", "referrer", ("requested", "received", "accepted"), None, "cancel-requested"),
        Move(
            "cancelled", "receiver", ("requested", "received", "accepted"), "cancelled", "cancelled"
        ),
        Move("return", "receiver", ("in-progress",), "completed", "completed"),
        Move("return-received", "referrer", ("completed",), None, "return-received"),
    )
}

TERMINAL = ("rejected", "cancelled")

#: how far along a status is; a packet never moves a referral backwards
RANK = {
    "draft": 0,
    "requested": 1,
    "received": 2,
    "accepted": 3,
    "rejected": 9,
    "in-progress": 4,
    "cancelled": 9,
    "completed": 5,
}


def check(event: str, status: str, side: str) -> Move:
    """The move for ``event`` from ``status`` taken on ``side``; IllegalTransition otherwise."""
    move = MOVES.get(event)
    if move is None:
        raise IllegalTransition(f"unknown referral step '{event}'")
    if move.by != side:
        raise IllegalTransition(
            f"only the {move.by} may '{event}' a referral (this side is the {side})"
        )
    if status not in move.sources:
        raise IllegalTransition(
            f"cannot '{event}' a referral that is '{status}' "
            f"(allowed from: {', '.join(move.sources)})"
        )
    return move


def target_for_status(status: str) -> str | None:
    """The event a client asks for by setting Task.status (PUT Task)."""
    return {
        "received": "received",
        "accepted": "accept",
        "rejected": "reject",
        "in-progress": "arrive",
        "completed": "return",
    }.get(status)
