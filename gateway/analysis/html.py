"""A self-contained HTML report: inline SVG charts drawn here, inline CSS, no script to run and
nothing fetched from the network, so it opens from a mail attachment or an air-gapped laptop.

The data behind every chart (and the whole report) is embedded as JSON in
``<script type="application/json" id="report-data">``, so tools can read the page without a
browser: ``{"report": <Report.to_dict()>, "charts": {<chart id>: {...}}}``.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Sequence
from typing import Any

import orjson

from gateway.analysis.report import Report, format_window, jsonable

__all__ = ["render_html"]

_PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777")
_W, _H = 920, 260
_ML, _MR, _MT, _MB = 76, 150, 16, 34  # margins; the legend sits in the right one
_OVERALL = "all payments"
_OVERALL_COLOR = "#374151"
_TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
               172800, 604800)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#111827}
body{margin:24px auto;max-width:980px;padding:0 12px}
h1{font-size:20px;margin:0 0 4px}
h2{font-size:16px;margin:28px 0 8px}
.meta{color:#6b7280;font-size:12px}
.headline{border-radius:6px;padding:12px 14px;margin:14px 0;font-weight:600}
.headline.bad{background:#fef2f2;border:1px solid #fecaca;color:#991b1b}
.headline.ok{background:#f0fdf4;border:1px solid #bbf7d0;color:#166534}
.sub{font-weight:400;margin:4px 0 0;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:8px}
.card{border:1px solid #e5e7eb;border-radius:6px;padding:8px 12px;min-width:100px}
.card .k{color:#6b7280;font-size:12px}
.card .v{font-size:18px;font-weight:600}
figure{margin:18px 0}
figcaption{font-weight:600;margin-bottom:4px}
svg text{font-size:11px;fill:#374151}
svg .grid{stroke:#e5e7eb;stroke-width:1}
svg .worst{fill:#fecaca;fill-opacity:.55}
svg .lane{fill:#f3f4f6}
svg .pt{fill-opacity:0}
svg .pt:hover{fill-opacity:1}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid #e5e7eb;padding:4px 6px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f9fafb}
"""


def _e(value: Any) -> str:
    return html.escape("—" if value is None else str(value), quote=True)


def _epoch(value: dt.datetime) -> float:
    return value.replace(tzinfo=dt.timezone.utc).timestamp()


def _fmt_time(epoch: float, step: float) -> str:
    moment = dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
    if step >= 86400:
        return moment.strftime("%m-%d")
    return moment.strftime("%H:%M" if step >= 60 and moment.second == 0 else "%H:%M:%S")


def _color(index: int) -> str:
    return _PALETTE[index % len(_PALETTE)]


class _Axis:
    """Maps time to x and a value to y inside the plot area."""

    def __init__(self, t0: float, t1: float, y_max: float) -> None:
        self.t0, self.t1 = t0, max(t1, t0 + 1)
        self.y_max = y_max if y_max > 0 else 1.0
        self.left, self.right = _ML, _W - _MR
        self.top, self.bottom = _MT, _H - _MB

    def x(self, t: float) -> float:
        return self.left + (t - self.t0) / (self.t1 - self.t0) * (self.right - self.left)

    def y(self, v: float) -> float:
        return self.bottom - min(v, self.y_max) / self.y_max * (self.bottom - self.top)


def _time_ticks(axis: _Axis) -> str:
    span = axis.t1 - axis.t0
    step = next((s for s in _TICK_STEPS if span / s <= 8), _TICK_STEPS[-1])
    first = math.ceil(axis.t0 / step) * step
    parts = []
    t = first
    while t <= axis.t1:
        x = axis.x(t)
        parts.append(f'<line x1="{x:.1f}" y1="{axis.top}" x2="{x:.1f}" y2="{axis.bottom}" class="grid"/>'
                     f'<text x="{x:.1f}" y="{axis.bottom + 16}" text-anchor="middle">{_e(_fmt_time(t, step))}</text>')
        t += step
    return "".join(parts)


def _value_ticks(axis: _Axis, fmt: str) -> str:
    parts = []
    for i in range(5):
        v = axis.y_max * i / 4
        y = axis.y(v)
        label = f"{v:.0%}" if fmt == "pct" else f"{v:,.0f}"
        parts.append(f'<line x1="{axis.left}" y1="{y:.1f}" x2="{axis.right}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{axis.left - 6}" y="{y + 4:.1f}" text-anchor="end">{_e(label)}</text>')
    return "".join(parts)


def _highlight(axis: _Axis, window: tuple[float, float] | None, label: str) -> str:
    if window is None:
        return ""
    x0, x1 = axis.x(window[0]), axis.x(window[1])
    return (f'<rect x="{x0:.1f}" y="{axis.top}" width="{max(x1 - x0, 2):.1f}" height="{axis.bottom - axis.top}" '
            f'class="worst"><title>{_e(label)}</title></rect>')


def _legend(names: Sequence[str], colors: dict[str, str] | None = None) -> str:
    parts = []
    for i, name in enumerate(names):
        y = _MT + 10 + i * 18
        color = (colors or {}).get(name) or _color(i)
        parts.append(f'<rect x="{_W - _MR + 14}" y="{y - 9}" width="12" height="12" fill="{color}"/>'
                     f'<text x="{_W - _MR + 32}" y="{y + 1}">{_e(name)}</text>')
    return "".join(parts)


def _line_chart(chart_id: str, title: str, series: dict[str, list[tuple[float, float | None, str]]],
                t_range: tuple[float, float], bucket_s: int, *, y_max: float, fmt: str,
                window: tuple[float, float] | None, window_label: str, colors: dict[str, str]) -> str:
    """One path per series; a missing bucket breaks the line rather than bridging it."""
    axis = _Axis(t_range[0], t_range[1] + bucket_s, y_max)
    body = [_value_ticks(axis, fmt), _time_ticks(axis), _highlight(axis, window, window_label)]
    few = sum(len(points) for points in series.values()) <= 400
    for i, (name, points) in enumerate(series.items()):
        color = colors.get(name) or _color(i)
        dash = ' stroke-dasharray="5 3"' if name == _OVERALL else ""
        segments: list[list[str]] = []
        last_t: float | None = None
        for t, v, _tip in points:
            if v is None:
                last_t = None
                continue
            xy = f"{axis.x(t + bucket_s / 2):.1f},{axis.y(v):.1f}"
            if last_t is None or t - last_t > bucket_s * 1.5:
                segments.append([xy])
            else:
                segments[-1].append(xy)
            last_t = t
        for seg in segments:
            if len(seg) == 1:
                x, y = seg[0].split(",")
                body.append(f'<circle cx="{x}" cy="{y}" r="2.5" fill="{color}"/>')
            else:
                body.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="{color}" '
                            f'stroke-width="1.8"{dash}/>')
        if few:
            for t, v, tip in points:
                if v is not None:
                    body.append(f'<circle cx="{axis.x(t + bucket_s / 2):.1f}" cy="{axis.y(v):.1f}" r="3" '
                                f'fill="{color}" class="pt"><title>{_e(f"{name} {tip}")}</title></circle>')
    body.append(_legend(list(series), colors))
    return _svg(chart_id, title, "".join(body))


def _svg(chart_id: str, title: str, body: str, height: int = _H) -> str:
    return (f'<figure id="{_e(chart_id)}"><figcaption>{_e(title)}</figcaption>'
            f'<svg viewBox="0 0 {_W} {height}" width="100%" role="img" aria-label="{_e(title)}">{body}</svg></figure>')


def _nice_ceiling(value: float) -> float:
    """The next 1, 2, 2.5 or 5 times a power of ten: axis labels people can read."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= value)


def _latency_chart(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    y_max = _nice_ceiling(max((r["p99_ms"] or 0) for r in rows) * 1.05)
    axis = _Axis(0, 1, y_max)
    body = [_value_ticks(axis, "ms")]
    group_w = (axis.right - axis.left) / len(rows)
    bar_w = min(40.0, group_w / 4)
    for g, row in enumerate(rows):
        gx = axis.left + g * group_w + (group_w - 3 * bar_w) / 2
        for j, key in enumerate(("p50_ms", "p95_ms", "p99_ms")):
            v = row[key] or 0.0
            y = axis.y(v)
            body.append(f'<rect x="{gx + j * bar_w:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" '
                        f'height="{axis.bottom - y:.1f}" fill="{_color(j)}"><title>'
                        f'{_e(row["provider"])} {key[:3]} {v:,.1f} ms</title></rect>')
        body.append(f'<text x="{gx + 1.5 * bar_w:.1f}" y="{axis.bottom + 16}" text-anchor="middle">'
                    f'{_e(row["provider"])}</text>')
    body.append(_legend(["p50", "p95", "p99"]))
    return _svg("chart-latency", "Provider call latency (ms): p50, p95, p99", "".join(body))


def _breaker_chart(periods: list[dict[str, Any]], t_range: tuple[float, float], bucket_s: int,
                   providers: Sequence[str]) -> str:
    names = list(dict.fromkeys([*providers, *(p["provider"] for p in periods)]))
    if not names:
        return ""
    height = _MT + _MB + 26 * len(names)
    axis = _Axis(t_range[0], t_range[1] + bucket_s, 1.0)
    axis.bottom = height - _MB
    body = [_time_ticks(axis)]
    for i, name in enumerate(names):
        y = axis.top + 26 * i + 4
        body.append(f'<text x="{axis.left - 6}" y="{y + 13}" text-anchor="end">{_e(name)}</text>'
                    f'<rect x="{axis.left}" y="{y}" width="{axis.right - axis.left}" height="18" class="lane"/>')
        for p in periods:
            if p["provider"] != name:
                continue
            x0, x1 = axis.x(_epoch(p["first_seen"])), axis.x(_epoch(p["last_seen"]))
            tip = (f"{name} breaker open {p['first_seen']:%H:%M:%S}–{p['last_seen']:%H:%M:%S}, "
                   f"{p['refused']} refused, {p['trial_calls']} trial calls")
            body.append(f'<rect x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 3):.1f}" height="18" fill="#dc2626">'
                        f'<title>{_e(tip)}</title></rect>')
    return _svg("chart-breaker", "Breaker open periods", "".join(body), height)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f'<td class="num">{_e(_num(v))}</td>' if i in numeric else f"<td>{_e(_text(v))}</td>"
                        for i, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _num(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.1f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _text(v: Any) -> str:
    if isinstance(v, dt.datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    return "—" if v is None else str(v)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1%}"


def _json_script(data: Any) -> str:
    # "<" escaped as \u003c: the JSON stays valid and can never close the script element.
    text = orjson.dumps(jsonable(data), default=str).decode().replace("<", "\\u003c")
    return f'<script type="application/json" id="report-data">{text}</script>'


def render_html(report: Report) -> str:
    meta, summary = report.meta, report.summary
    bucket_s = meta["bucket_s"]
    approval = report.approval
    failure = report.failure_rate
    all_points = [p["bucket"] for s in failure["series"].values() for p in s]
    all_points += [p["bucket"] for p in approval["overall"]]
    head = report.headline
    window = (_epoch(head.start), _epoch(head.end)) if head else None
    window_label = f"worst window: {head.text}" if head else ""
    charts: dict[str, Any] = {}
    sections: list[str] = []
    # One colour per provider in every chart.
    names = sorted({*approval["series"], *failure["series"]})
    colors = {name: _color(i) for i, name in enumerate(names)} | {_OVERALL: _OVERALL_COLOR}

    if all_points:
        t_range = (_epoch(min(all_points)), _epoch(max(all_points)))
        approval_series: dict[str, list[tuple[float, float | None, str]]] = {}
        for name, points in approval["series"].items():
            approval_series[name] = [
                (_epoch(p["bucket"]), p["rate"], f"{p['bucket']:%H:%M:%S}: {p['approved']}/{p['payments']} approved")
                for p in points]
        approval_series[_OVERALL] = [
            (_epoch(p["bucket"]), p["rate"], f"{p['bucket']:%H:%M:%S}: {p['approved']}/{p['payments']} approved")
            for p in approval["overall"]]
        failure_series = {
            name: [(_epoch(p["bucket"]), p["rate"], f"{p['bucket']:%H:%M:%S}: {p['failures']}/{p['attempts']} failed")
                   for p in points]
            for name, points in failure["series"].items()}
        sections.append(_line_chart("chart-approval", "Approval rate over time (payments sent to each provider)",
                                    approval_series, t_range, bucket_s, y_max=1.0, fmt="pct",
                                    window=window, window_label=window_label, colors=colors))
        sections.append(_line_chart("chart-failure", "Failed attempts per provider (share of its attempts)",
                                    failure_series, t_range, bucket_s, y_max=1.0, fmt="pct",
                                    window=window, window_label=window_label, colors=colors))
        charts["chart-approval"] = {
            "bucket_s": bucket_s, "y": "approval rate",
            "series": {name: [[p[0], p[1]] for p in pts] for name, pts in approval_series.items()}}
        charts["chart-failure"] = {
            "bucket_s": bucket_s, "y": "failure rate",
            "series": {name: [[p[0], p[1]] for p in pts] for name, pts in failure_series.items()}}
        sections.append(_breaker_chart(report.breaker_open, t_range, bucket_s, list(failure["series"])))
        charts["chart-breaker"] = {"periods": report.breaker_open}
    sections.append(_latency_chart(report.latency["attempts"]))
    charts["chart-latency"] = {"rows": report.latency["attempts"]}
    charts["worst_window"] = None if head is None else {
        "provider": head.provider, "start": head.start, "end": head.end, "error_class": head.error_class,
        "raw_code": head.raw_code}

    tables = []
    if report.failures:
        tables.append("<h2>Failures by provider × class × raw code</h2>" + _table(
            ("provider", "class", "raw code", "attempts", "payments", "first", "last"),
            [(r["provider"], r["class"], r["raw_code"], r["attempts"], r["payments"], r["first_seen"], r["last_seen"])
             for r in report.failures[:50]], numeric=(3, 4)))
    fo = report.failovers
    tables.append("<h2>Failovers, retries, reroutes</h2>" + _table(
        ("", "payments", "count", "saved (ended approved)"),
        [("failover to the next provider", fo["payments_with_failover"], fo["failovers"], fo["saved_by_failover"]),
         ("retry at the same provider", fo["payments_with_retry"], fo["retries"], fo["saved_by_retry"]),
         ("… approved by the retried try itself", None, None, fo["approved_on_retry"]),
         ("rerouted (provider skipped)", fo["payments_rerouted"], None, fo["saved_by_reroute"])]
        + [(f"{r['reason']} → {r['to_provider']}", None, r["failovers"], r["approved_there"])
           for r in fo["by_reason"]],
        numeric=(1, 2, 3)))
    lat_rows = [("call", r["provider"], r["calls"], r["p50_ms"], r["p95_ms"], r["p99_ms"], r["max_ms"])
                for r in report.latency["attempts"]]
    lat_rows += [("payment", r["provider"], r["payments"], r["p50_ms"], r["p95_ms"], r["p99_ms"], r["max_ms"])
                 for r in report.latency["payments"]]
    tables.append("<h2>Latency (ms)</h2>" + _table(("", "provider", "count", "p50", "p95", "p99", "max"), lat_rows,
                                                   numeric=(2, 3, 4, 5, 6)))
    if report.breaker_open:
        tables.append("<h2>Breaker open periods</h2>" + _table(
            ("provider", "first seen open", "last seen open", "refused", "trial calls", "closed again"),
            [(r["provider"], r["first_seen"], r["last_seen"], r["refused"], r["trial_calls"], r["closed_seen_at"])
             for r in report.breaker_open[:100]], numeric=(3, 4)))
    pending = report.pending
    if pending["payments"]:
        tables.append(
            f"<h2>Pending payments: {pending['payments']:,}</h2><p>"
            + _e(", ".join(f"{k}: {v:,}" for k, v in sorted(pending["by_resolution"].items())))
            + f"; median resolve {_e(pending['median_resolve_s'])} s, max {_e(pending['max_resolve_s'])} s</p>"
            + _table(("payment", "provider", "pending at", "resolution", "resolved at", "after s"),
                     [(r["payment_id"], r["provider"], r["pending_at"], r["resolution"], r["reconciled_at"],
                       r["resolved_after_s"]) for r in pending["list"]], numeric=(5,)))
    if report.declines:
        tables.append("<h2>Top decline codes</h2>" + _table(
            ("code", "class", "attempts", "payments", "by provider"),
            [(r["code"], r["class"], r["attempts"], r["payments"],
              ", ".join(f"{k} {v:,}" for k, v in sorted(r["by_provider"].items()))) for r in report.declines],
            numeric=(2, 3)))
    if report.errors:
        tables.append("<h2>Failed payments by error code</h2>" + _table(
            ("error code", "payments"), [(r["error_code"], r["payments"]) for r in report.errors], numeric=(1,)))

    headline_cls = "bad" if head else "ok"
    window_text = ""
    if head:
        window_text = (f"<p class=\"sub\">{_e(head.provider)} · {_e(head.error_class)}/{_e(head.raw_code)} · "
                       f"{_e(format_window(head.start, head.end, bucket_s))} UTC · first failure "
                       f"{head.first_failure:%H:%M:%S.%f}, last {head.last_failure:%H:%M:%S.%f}</p>")
    cards = [
        ("payments", f"{summary['payments']:,}"),
        ("approved", _pct(summary["approval_rate"])),
        ("failed", f"{summary['failed']:,}"),
        ("pending", f"{summary['pending']:,}"),
        ("saved by failover", f"{fo['saved_by_failover']:,}"),
        ("saved by retry", f"{fo['saved_by_retry']:,}"),
        ("rerouted and approved", f"{fo['saved_by_reroute']:,}"),
    ]
    card_html = "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div></div>'
                        for k, v in cards)
    span = f"{_text(summary['first_ts'])} → {_text(summary['last_ts'])} UTC"
    data = {"report": report.to_dict(), "charts": charts}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Transaction log report: {_e(report.headline_text[:80])}</title>
<style>{_CSS}</style></head>
<body>
<h1>Transaction log report</h1>
<div class="meta">{len(meta['files'])} files · {summary['lines']:,} lines
({summary['unreadable_lines']:,} unreadable) · {_e(span)} · bucket {bucket_s}s ·
generated {_e(_text(meta['generated_at']))} UTC</div>
<div class="headline {headline_cls}">{_e(report.headline_text)}{window_text}</div>
<div class="cards">{card_html}</div>
{''.join(sections)}
{''.join(tables)}
<h2>Files</h2><ul class="meta">{''.join(f'<li>{_e(f)}</li>' for f in meta['files'])}</ul>
{_json_script(data)}
</body></html>
"""
