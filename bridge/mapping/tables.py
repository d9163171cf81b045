"""What the node remembers about codes its maps could not translate (``hutong mapping check``)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from bridge.store.types import UTCDateTime


class MappingGap(SQLModel, table=True):
    """One row per (site, map, system, code) an adapter met without a mapping; ``count`` is how
    many times. ``system`` tells the direction: the site's own system (a local code going out
    with no standard code) or the shared one (an arriving code with no local code)."""

    __tablename__ = "mapping_gap"
    __table_args__ = (UniqueConstraint("site", "map", "system", "code"),)

    id: int | None = Field(default=None, primary_key=True)
    site: str = Field(max_length=48)
    map: str = Field(max_length=48)  # "" when no map of the site covers the system
    system: str = Field(max_length=200)
    code: str = Field(max_length=100)
    display: str = Field(default="", max_length=200)
    count: int = 0
    first_seen: datetime = Field(sa_type=UTCDateTime)
    last_seen: datetime = Field(sa_type=UTCDateTime)


MAPPING_GAP = MappingGap.__table__  # type: ignore[attr-defined]
