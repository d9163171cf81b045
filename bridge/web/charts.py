"""Bar charts as inline SVG, drawn on the server (no JavaScript library, prints as is)."""

from __future__ import annotations

from collections.abc import Sequence

from bridge.web.layout import e

COLOURS = ("#1d4e89", "#e07b24", "#4a9a3f", "#a23b72", "#6c757d")


def grouped_bars(
    title: str,
    groups: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    *,
    cls: str = "chart",
    width: int = 760,
    height: int = 260,
) -> str:
    """One group of bars per label in ``groups``; ``series`` = (name, one value per group).

    Each bar carries its value in a <title> (hover) and ``data-value`` (tests, scrapers)."""
    left, right, top, bottom = 44, 12, 30, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max([v for _, vals in series for v in vals] + [0])
    top_value = _nice(peak)
    n_groups, n_series = max(len(groups), 1), max(len(series), 1)
    group_w = plot_w / n_groups
    bar_w = max(min(group_w * 0.8 / n_series, 40), 2)
    parts = [
        (
            f'<svg class="{e(cls)}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{e(title)}"><title>{e(title)}</title>'
            f'<text x="{left}" y="18" font-size="13" font-weight="bold">{e(title)}</text>'
        )
    ]
    for i in range(5):  # grid and y axis labels
        v = top_value * i / 4
        y = top + plot_h - plot_h * i / 4
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="#dde" /><text x="{left - 4}" y="{y + 4:.1f}" font-size="10" '
            f'text-anchor="end">{_num(v)}</text>'
        )
    for gi, label in enumerate(groups):
        x0 = left + gi * group_w + (group_w - bar_w * n_series) / 2
        for si, (name, vals) in enumerate(series):
            v = vals[gi] if gi < len(vals) else 0
            h = 0 if top_value == 0 else plot_h * v / top_value
            x = x0 + si * bar_w
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{top + plot_h - h:.1f}" '
                f'width="{bar_w - 1:.1f}" height="{h:.1f}" '
                f'fill="{COLOURS[si % len(COLOURS)]}" data-series="{e(name)}" '
                f'data-group="{e(label)}" data-value="{_num(v)}">'
                f"<title>{e(label)} · {e(name)}: {_num(v)}</title></rect>"
            )
        parts.append(
            f'<text x="{left + gi * group_w + group_w / 2:.1f}" '
            f'y="{top + plot_h + 14}" font-size="10" text-anchor="middle">'
            f"{e(label)}</text>"
        )
    lx = left
    for si, (name, _vals) in enumerate(series):  # legend
        parts.append(
            f'<rect x="{lx}" y="{height - 16}" width="10" height="10" '
            f'fill="{COLOURS[si % len(COLOURS)]}" /><text x="{lx + 14}" '
            f'y="{height - 7}" font-size="11">{e(name)}</text>'
        )
        lx += 24 + 12 * len(name)
    parts.append("</svg>")
    return "".join(parts)


def _nice(peak: float) -> float:
    """A round axis maximum at or above ``peak`` (1, 2, 5 × 10^n)."""
    if peak <= 0:
        return 1.0
    base = 1.0
    while base * 10 <= peak:
        base *= 10
    for step in (1, 2, 5, 10):
        if step * base >= peak:
            return step * base
    return 10 * base


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.1f}"
