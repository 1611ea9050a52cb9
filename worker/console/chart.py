"""Delivered and failed per minute as an SVG bar chart, drawn on the server (no script)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from worker.admin_reports import Minute

WIDTH, HEIGHT, AXIS = 720, 140, 18  # pixels; AXIS: room for the labels below


@dataclasses.dataclass(frozen=True)
class Bar:
    x: float
    width: float
    delivered_y: float
    delivered_h: float
    failed_y: float
    failed_h: float
    title: str  # the tooltip: the minute and its figures


@dataclasses.dataclass(frozen=True)
class Chart:
    width: int
    height: int
    plot_height: int
    bars: list[Bar]
    peak: int  # the top of the scale
    first_label: str
    last_label: str
    delivered: int
    failed: int


def throughput_chart(minutes: Sequence[Minute]) -> Chart:
    """Per minute, delivered (below) and failed attempts (stacked on top), to one scale."""
    plot = HEIGHT - AXIS
    peak = max((m.delivered + m.failed for m in minutes), default=0) or 1
    slot = WIDTH / max(1, len(minutes))
    bars = []
    for n, m in enumerate(minutes):
        delivered_h = plot * m.delivered / peak
        failed_h = plot * m.failed / peak
        bars.append(
            Bar(
                x=round(n * slot + 1, 1),
                width=round(max(1.0, slot - 2), 1),
                delivered_y=round(plot - delivered_h, 1),
                delivered_h=round(delivered_h, 1),
                failed_y=round(plot - delivered_h - failed_h, 1),
                failed_h=round(failed_h, 1),
                title=f"{m.start:%H:%M} UTC: {m.delivered} delivered, {m.failed} failed",
            )
        )
    return Chart(
        width=WIDTH,
        height=HEIGHT,
        plot_height=plot,
        bars=bars,
        peak=peak,
        first_label=f"{minutes[0].start:%H:%M}" if minutes else "",
        last_label=f"{minutes[-1].start:%H:%M}" if minutes else "",
        delivered=sum(m.delivered for m in minutes),
        failed=sum(m.failed for m in minutes),
    )
