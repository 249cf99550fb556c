"""A sustained run as a small hand-written SVG: accepted events/s and log pending bytes over
time, one line per server. No plotting dependency: a chart is a few polylines."""

from __future__ import annotations

from html import escape

WIDTH, PANEL_HEIGHT, MARGIN_LEFT, MARGIN_RIGHT, GAP = 760, 220, 80, 170, 50
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def _nice_max(value: float) -> float:
    """The smallest 1/2/5 x 10^n at or above ``value`` (an axis top)."""
    if value <= 0:
        return 1.0
    scale = 1.0
    while scale * 10 <= value:
        scale *= 10
    while scale > value:
        scale /= 10
    for step in (1, 2, 5, 10):
        if step * scale >= value:
            return step * scale
    return 10 * scale


def _panel(series, top: float, title: str, unit: str, x_max: float, divisor: float) -> list[str]:
    """``series``: [(label, [(t, value)])]; values divided by ``divisor`` for the axis."""
    plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = PANEL_HEIGHT - 40
    y0 = top + 25
    y_max = _nice_max(max((v for _, pts in series for _, v in pts), default=0) / divisor)
    out = [
        f'<text x="{MARGIN_LEFT}" y="{top + 15}" font-weight="bold">{escape(title)}</text>',
        f'<rect x="{MARGIN_LEFT}" y="{y0}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#999"/>',
    ]
    for i in range(5):
        value = y_max * i / 4
        y = y0 + plot_h - plot_h * i / 4
        out.append(
            f'<line x1="{MARGIN_LEFT}" x2="{MARGIN_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#eee"/>'
        )
        out.append(
            f'<text x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{value:,.0f}{escape(unit)}</text>"
        )
    for i in range(5):
        x = MARGIN_LEFT + plot_w * i / 4
        out.append(
            f'<text x="{x:.1f}" y="{y0 + plot_h + 15}" text-anchor="middle">'
            f"{x_max * i / 4:,.0f} s</text>"
        )
    for n, (label, points) in enumerate(series):
        color = COLORS[n % len(COLORS)]
        coords = " ".join(
            f"{MARGIN_LEFT + plot_w * t / x_max:.1f},"
            f"{y0 + plot_h - plot_h * min(v / divisor / y_max, 1.0):.1f}"
            for t, v in points
        )
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
        ly = y0 + 12 + 18 * n
        out.append(
            f'<line x1="{MARGIN_LEFT + plot_w + 10}" x2="{MARGIN_LEFT + plot_w + 30}" '
            f'y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" stroke-width="2"/>'
        )
        out.append(f'<text x="{MARGIN_LEFT + plot_w + 35}" y="{ly}">{escape(label)}</text>')
    return out


def sustained_svg(title: str, rates, pending) -> str:
    """``rates``/``pending``: [(label, [(t_s, events_per_s or bytes)])], one entry per line."""
    x_max = max((t for _, pts in [*rates, *pending] for t, _ in pts), default=1.0) or 1.0
    height = 30 + 2 * PANEL_HEIGHT + GAP
    body = [f'<text x="{MARGIN_LEFT}" y="18" font-size="14" font-weight="bold">{escape(title)}'
            "</text>"]  # fmt: skip
    body += _panel(rates, 25, "accepted events/s (10 s windows)", "", x_max, 1.0)
    body += _panel(pending, 25 + PANEL_HEIGHT + GAP, "log pending roll", " MiB", x_max, 2**20)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">\n'
        '<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n"
    )
