"""HTML of the dashboard: Jinja2 templates with autoescaping, and the inline SVG charts.

Every value that reaches a page goes through Jinja2's autoescape, so a hostile User-Agent,
caller number or tenant name is shown as text, never run. The SVG builders here emit only
numbers they computed and text that ``Markup.format`` escaped. Money is shown
with ``guard.money.format_money`` and the tenant's currency, times in the tenant's time zone.
Pages are made of *fragments* (``templates/fragments/*.html``): the page renders them in place,
and the live stream re-renders the same ones, so there is one way to draw each part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from guard.money import format_money
from guard.schedule import zone

BAR_WIDTH = 160
BAR_HEIGHT = 12
CHART_WIDTH = 720
CHART_HEIGHT = 200
_PAD = 32


def money(amount: int | None, currency: str = "", none: str = "no limit") -> str:
    """``12.5000 GBP`` (or ``none`` for a missing limit)."""
    if amount is None:
        return none
    return f"{format_money(amount)} {currency}".strip()


def local_time(epoch: float | None, timezone: str = "UTC", fmt: str = "%H:%M:%S") -> str:
    """Epoch seconds as wall-clock text in ``timezone`` (``-`` for none)."""
    if not epoch:
        return "-"
    return datetime.fromtimestamp(epoch, zone(timezone)).strftime(fmt)


def duration(seconds: float | None) -> str:
    """``1:02:03`` or ``2:03``."""
    if seconds is None:
        return "-"
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.0f}%"


def spend_bar(spent: int, reserved: int, limit: int | None) -> Markup:
    """A bar of ``spent`` then ``reserved`` against ``limit``, as inline SVG."""
    if limit is None:
        return Markup('<span class="muted">no limit</span>')
    used = spent + reserved
    if limit > 0:
        spent_w = min(BAR_WIDTH, spent * BAR_WIDTH / limit)
        reserved_w = min(BAR_WIDTH - spent_w, reserved * BAR_WIDTH / limit)
    else:
        spent_w, reserved_w = float(BAR_WIDTH), 0.0
    level = "over" if used >= limit else "high" if used * 5 >= limit * 4 else "ok"
    title = (
        f"spent {format_money(spent)}, reserved {format_money(reserved)} of {format_money(limit)}"
    )
    return Markup(
        '<svg class="bar {level}" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img"'
        ' aria-label="{title}"><title>{title}</title>'
        '<rect class="track" width="{w}" height="{h}" rx="2"/>'
        '<rect class="spent" width="{spent_w:.1f}" height="{h}" rx="2"/>'
        '<rect class="reserved" x="{spent_w:.1f}" width="{reserved_w:.1f}" height="{h}"/></svg>'
    ).format(
        level=level,
        w=BAR_WIDTH,
        h=BAR_HEIGHT,
        title=title,
        spent_w=spent_w,
        reserved_w=reserved_w,
    )


def hourly_chart(hourly: Mapping[str, Any]) -> Markup:
    """Spend by hour (bars) and running total (line, against the daily limit) as inline SVG."""
    hours: Sequence[Mapping[str, int]] = hourly["hours"]
    currency = str(hourly["currency"])
    limit: int | None = hourly["daily_limit"]
    top_hour = max([h["spent"] for h in hours] + [1])
    total = hours[-1]["cumulative"] if hours else 0
    top_total = max(total, limit or 0, 1)
    inner_w, inner_h = CHART_WIDTH - 2 * _PAD, CHART_HEIGHT - 2 * _PAD
    base_y = _PAD + inner_h
    step = inner_w / 24
    parts = [
        Markup(
            '<svg class="chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img"'
            ' aria-label="spend by hour of {day}">'
            '<line class="axis" x1="{pad}" y1="{y}" x2="{x2}" y2="{y}"/>'
        ).format(
            w=CHART_WIDTH, h=CHART_HEIGHT, day=hourly["day"], pad=_PAD, y=base_y, x2=_PAD + inner_w
        )
    ]
    points = [f"{_PAD:.1f},{base_y:.1f}"]
    for h in hours:
        height = inner_h * h["spent"] / top_hour
        x = _PAD + h["hour"] * step + 2
        parts.append(
            Markup(
                '<rect class="hour" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}">'
                "<title>{hour:02d}:00 {amount}</title></rect>"
            ).format(
                x=x,
                y=base_y - height,
                w=step - 4,
                h=height,
                hour=h["hour"],
                amount=money(h["spent"], currency),
            )
        )
        if h["hour"] % 3 == 0:
            parts.append(
                Markup('<text class="label" x="{x:.1f}" y="{y}">{hour:02d}h</text>').format(
                    x=x, y=CHART_HEIGHT - 12, hour=h["hour"]
                )
            )
        cumulative_y = base_y - inner_h * h["cumulative"] / top_total
        points.append(f"{_PAD + (h['hour'] + 1) * step:.1f},{cumulative_y:.1f}")
    parts.append(
        Markup('<polyline class="cumulative" points="{points}"/>').format(points=" ".join(points))
    )
    if limit is not None:
        y = base_y - inner_h * limit / top_total
        parts.append(
            Markup(
                '<line class="limit" x1="{pad}" y1="{y:.1f}" x2="{x2}" y2="{y:.1f}"/>'
                '<text class="label" x="{tx}" y="{ty:.1f}" text-anchor="end">limit {amount}</text>'
            ).format(
                pad=_PAD,
                y=y,
                x2=_PAD + inner_w,
                tx=_PAD + inner_w - 4,
                ty=y - 4,
                amount=money(limit, currency),
            )
        )
    parts.append(
        Markup(
            '<text class="label" x="{x}" y="{y}">busiest hour {top} · day {total}</text></svg>'
        ).format(
            x=_PAD,
            y=_PAD - 10,
            top=money(max(h["spent"] for h in hours) if hours else 0, currency),
            total=money(total, currency),
        )
    )
    return Markup("").join(parts)


def path_part(text: str) -> str:
    """``text`` quoted for one URL path segment."""
    return quote(text, safe="")


def environment() -> Environment:
    """The templates of ``guard/dashboard/templates``, autoescaped, with the filters above."""
    env = Environment(
        loader=PackageLoader("guard.dashboard", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        money=money,
        local_time=local_time,
        duration=duration,
        percent=percent,
        path_part=path_part,
    )
    env.globals.update(spend_bar=spend_bar, hourly_chart=hourly_chart)
    return env
