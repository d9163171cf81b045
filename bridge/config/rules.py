"""Routing rules: who may send which kind of message to whom. Default deny.

Every member is an independent system (HIS间相互独立): a packet is accepted only if some rule
allows its (sender, recipient, kind). A pattern in ``from``/``to`` is a member id,
``role:<role>`` or ``*``; ``*`` in ``kinds`` allows every kind. Only alliance members ever match.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol


class _HasRole(Protocol):
    @property
    def role(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Rule:
    index: int  # position in alliance.toml, so the IT page and logs can name it (rules[index])
    from_: str
    to: str
    kinds: tuple[str, ...]
    note: str | None = None


def pattern_matches(pattern: str, member_id: str, directory: Mapping[str, _HasRole]) -> bool:
    member = directory.get(member_id)
    if member is None:
        return False
    if pattern == "*":
        return True
    if pattern.startswith("role:"):
        return member.role == pattern[5:]
    return pattern == member_id


class RuleSet:
    """The alliance's allow rules, read-only, evaluated against the member directory."""

    __slots__ = ("_directory", "_rules")

    def __init__(self, rules: Iterable[Rule], directory: Mapping[str, _HasRole]) -> None:
        self._rules = tuple(rules)
        self._directory = directory

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._rules

    def matching_rule(self, sender: str, recipient: str, kind: str) -> Rule | None:
        """The first rule that allows this exchange, to explain a decision; None = denied."""
        for rule in self._rules:
            if (
                ("*" in rule.kinds or kind in rule.kinds)
                and pattern_matches(rule.from_, sender, self._directory)
                and pattern_matches(rule.to, recipient, self._directory)
            ):
                return rule
        return None

    def allows(self, sender: str, recipient: str, kind: str) -> bool:
        return self.matching_rule(sender, recipient, kind) is not None

    def describe(self) -> list[dict[str, Any]]:
        """Rules with their patterns expanded to member ids, for the IT page."""
        ids = sorted(self._directory)
        return [
            {
                "index": rule.index,
                "from": rule.from_,
                "to": rule.to,
                "kinds": list(rule.kinds),
                "note": rule.note,
                "senders": [m for m in ids if pattern_matches(rule.from_, m, self._directory)],
                "recipients": [m for m in ids if pattern_matches(rule.to, m, self._directory)],
            }
            for rule in self._rules
        ]

    def __repr__(self) -> str:
        return f"RuleSet({len(self._rules)} rules, {len(self._directory)} members)"
