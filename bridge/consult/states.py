"""The consultation state machine, the same on both sides: who takes each step, from where.

Every step names the business step it leads to, and ``Task.status`` follows from the step
(``codes.STEP_STATUS``), so two sides that applied the same steps hold the same Task. Each side
writes only its own steps, and the two sides' steps never start from the same step except a
cancellation; that one is the centre's to decide: the inviting side *asks* (``cancel``), the
centre confirms (``cancelled``) or, once the meeting has begun, refuses (``cancel-refused``),
the way a referral's withdrawal works. A step arriving for a cancelled or closed consultation
changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.errors import IllegalTransition

INVITER, CENTRE = "inviter", "centre"
BEFORE_MEETING = ("requested", "received", "returned", "resubmitted", "scheduled")


@dataclass(frozen=True)
class Move:
    event: str
    by: str  # inviter | centre
    sources: tuple[str, ...]  # steps it may start from
    target: str | None  # the step after it (None: unchanged)


MOVES: dict[str, Move] = {
    m.event: m
    for m in (
        Move("request", INVITER, ("draft",), "requested"),
        Move("received", CENTRE, ("requested",), "received"),
        Move("return", CENTRE, ("received", "resubmitted"), "returned"),
        Move("resubmit", INVITER, ("returned",), "resubmitted"),
        Move("schedule", CENTRE, ("received", "resubmitted", "scheduled"), "scheduled"),
        Move("start", CENTRE, ("scheduled",), "in-consultation"),
        Move("report", CENTRE, ("in-consultation", "reported"), "reported"),
        Move("release", CENTRE, ("reported",), "released"),
        Move("report-received", INVITER, ("released",), "report-received"),
        Move("follow-up", INVITER, ("report-received", "follow-up-planned"), "follow-up-planned"),
        Move("close", INVITER, ("report-received", "follow-up-planned"), "closed"),
        Move("cancel", INVITER, BEFORE_MEETING, None),
        Move("cancelled", CENTRE, BEFORE_MEETING, "cancelled"),
    )
}

#: steps after which nothing moves
TERMINAL = ("cancelled", "closed")
#: steps where the consultation waits for someone (the reminder job watches these; a scheduled
#: one waits for its meeting, not for a person)
WAITING = ("requested", "received", "resubmitted", "returned", "reported")


def check(event: str, step: str, side: str) -> Move:
    """The move for ``event`` from ``step`` taken on ``side``; IllegalTransition otherwise."""
    move = MOVES.get(event)
    if move is None:
        raise IllegalTransition(f"unknown consultation step '{event}'")
    if move.by != side:
        raise IllegalTransition(
            f"only the {move.by} may '{event}' a consultation (this side is the {side})"
        )
    if step not in move.sources:
        raise IllegalTransition(
            f"cannot '{event}' a consultation that is '{step}' "
            f"(allowed from: {', '.join(move.sources)})"
        )
    return move
