"""A search's report as one self-contained page (inline SVG, no scripts): the outcome in words, the
Pareto scatters (size against quality, speed against quality) with the front joined and the chosen
candidate marked, and the candidate table with each candidate's recipe, rung, status and numbers.
Drawn with report_html's shapes, by hand for the same reason (a few SVG elements)."""

from __future__ import annotations

from html import escape
from collections.abc import Callable
from typing import Any

from service.core.report_html import COLOURS, WIDTH, bars as _bars, fmt as _fmt
from service.core.search_select import CandidatePoint

PLOT_HEIGHT = 240
TOP = 44  # title and the quality axis's label above the plot


def _point(candidate: dict[str, Any]) -> CandidatePoint | None:
    return CandidatePoint.model_validate(candidate["metrics"]) if candidate.get("metrics") else None


def _pareto_scatter(title: str, axis: str, value: Callable[[CandidatePoint], float], candidates: list[dict[str, Any]], front: set[str],
                    best: str | None, quality: str) -> str:
    """x: the axis (compression ratio or speedup, larger is better); y: quality (accuracy or fidelity)."""
    measured = [(m, c) for c in candidates if (m := _point(c)) is not None]
    points = [(value(m), q, c, m) for m, c in measured if (q := m.quality(quality)) is not None]
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_low, x_high = min(xs + [1.0]), max(xs) * 1.08
    y_low, y_high = min(ys), max(ys)
    y_span = (y_high - y_low) or max(abs(y_high) * 0.01, 1e-3)
    w, h = WIDTH - 90, PLOT_HEIGHT

    def place(x: float, y: float) -> tuple[float, float]:
        return 50 + w * (x - x_low) / ((x_high - x_low) or 1.0), TOP + h * (1 - (y - y_low + y_span * 0.05) / (y_span * 1.1))

    parts = [f'<svg class="pareto" role="img" aria-label="{escape(title)}" width="{WIDTH}" height="{h + TOP + 46}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="0" y="14" font-weight="bold">{escape(title)}</text>',
             f'<text x="0" y="32" font-size="11">{escape(quality)} ↑ ({escape(_fmt(y_low))} .. {escape(_fmt(y_high))})</text>',
             f'<line x1="50" y1="{TOP + h}" x2="{50 + w}" y2="{TOP + h}" stroke="#333"/><line x1="50" y1="{TOP}" x2="50" y2="{TOP + h}" stroke="#333"/>',
             f'<text x="{w - 90}" y="{h + TOP + 20}" font-size="11">{escape(axis.replace("_", " "))} →</text>']
    for fraction in (0.0, 0.5, 1.0):  # axis values, and the original (1x, its own quality) as the reference
        x_value, y_value = x_low + (x_high - x_low) * fraction, y_low + y_span * (fraction * 1.1 - 0.05)
        tx, _ = place(x_value, y_low)
        _, ty = place(x_low, y_value)
        parts.append(f'<text x="{tx:.1f}" y="{TOP + h + 12}" font-size="10" text-anchor="middle">{x_value:.3g}x</text>')
        parts.append(f'<text x="46" y="{ty + 3:.1f}" font-size="10" text-anchor="end">{y_value:.3g}</text>')
    if x_low <= 1.0:
        ox, _ = place(1.0, y_low)
        parts.append(f'<line x1="{ox:.1f}" y1="{TOP}" x2="{ox:.1f}" y2="{TOP + h}" stroke="#999" stroke-dasharray="2 2"/>'
                     f'<text x="{ox + 3:.1f}" y="{TOP + 10}" font-size="10" fill="#666">original (1x)</text>')
    on_front = sorted((p for p in points if p[2]["job_id"] in front), key=lambda p: p[0])
    if len(on_front) > 1:
        coords = " ".join("{:.1f},{:.1f}".format(*place(x, y)) for x, y, _, _ in on_front)
        parts.append(f'<polyline class="front" points="{coords}" fill="none" stroke="{COLOURS["compressed"]}" stroke-dasharray="4 3"/>')
    for x, y, c, m in points:
        cx, cy = place(x, y)
        chosen = c["job_id"] == best
        colour = COLOURS["chosen"] if chosen else (COLOURS["point"] if m.meets_constraint else COLOURS["original"])
        parts.append(f'<circle class="{"chosen" if chosen else "candidate"}" cx="{cx:.1f}" cy="{cy:.1f}" r="{8 if chosen else 5}" fill="{colour}">'
                     f'<title>{escape(str(c["recipe"]))} (rung {c["rung"] + 1}): {x:.3g}x, {quality} {y:.4g}</title></circle>')
    parts.append(f'<text x="50" y="{h + TOP + 38}" font-size="11">orange: best; blue: meets the constraint; grey: misses it; dashed: the Pareto front</text></svg>')
    return "".join(parts)


def _table(candidates: list[dict[str, Any]], front: set[str], best: str | None) -> str:
    points = [_point(c) for c in candidates]
    llm = any(m is not None and m.perplexity_increase is not None for m in points)
    # An LLM's quality is perplexity (its speed decode tokens/s); an ONNX model's accuracy and fidelity.
    quality_heads = "<th>perplexity</th>" if llm else "<th>accuracy</th><th>fidelity</th>"
    head = f"<tr><th>recipe</th><th>rung</th><th>status</th><th>size ratio</th><th>speedup</th>{quality_heads}<th>meets</th><th>Pareto</th></tr>"
    # The original as the reference row: 1x on both axes, its own accuracy, fidelity 1 by definition.
    original_accuracy = next((m.accuracy + m.accuracy_drop for m in points if m is not None and m.accuracy is not None and m.accuracy_drop is not None), None)
    reference_quality = "<td>+0%</td>" if llm else f'<td>{_fmt(original_accuracy) if original_accuracy is not None else ""}</td><td>1</td>'
    rows = [f'<tr class="original"><td><i>the original model</i></td><td></td><td>reference</td><td>1x</td><td>1x</td>{reference_quality}<td></td><td></td></tr>']

    def quality_cells(m: CandidatePoint) -> tuple[str, ...]:
        if llm:
            return (f"{100 * m.perplexity_increase:+.1f}%" if m.perplexity_increase is not None else "",)
        return (_fmt(m.accuracy), _fmt(m.fidelity))

    for c, m in zip(candidates, points):
        note = escape(c["error"]["code"]) if c.get("error") else ""
        mark = " ★" if c["job_id"] == best else ""
        empty = ("",) * (4 if llm else 5)
        cells = [f'{escape(str(c["recipe"]))}{mark}<br><code>{escape(c["job_id"])}</code>', str(c["rung"] + 1), f'{escape(c["status"])} {note}',
                 *(empty if m is None else (_fmt(m.compression_ratio), _fmt(m.speedup), *quality_cells(m), "yes" if m.meets_constraint else "no")),
                 "yes" if c["job_id"] in front else ""]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    return f'<table class="candidates">{head}{"".join(rows)}</table>'


def _quality_words(m: CandidatePoint, quality: str) -> str:
    if quality == "perplexity" and m.perplexity_increase is not None:
        return f"perplexity {100 * m.perplexity_increase:+.1f}% (decode speed is the speed)"
    return f"{quality} {_fmt(m.quality(quality))}"


def render_search(search: dict[str, Any]) -> str:
    request, candidates, best = search["request"], search["candidates"], search.get("best")
    front = set(search.get("pareto") or [])
    quality = "accuracy" if request.get("max_accuracy_drop") is not None else ("perplexity" if request.get("max_perplexity_increase") is not None else "fidelity")
    constraint = " and ".join(
        text for text in (
            f"accuracy within {request['max_accuracy_drop'] * 100:.3g} points" if request.get("max_accuracy_drop") is not None else "",
            f"fidelity (cosine) at least {request['min_fidelity']}" if request.get("min_fidelity") is not None else "",
            f"perplexity within +{request['max_perplexity_increase'] * 100:.3g}% (quality drawn as the original's perplexity / the candidate's)"
            if request.get("max_perplexity_increase") is not None else "",
        ) if text
    )
    sections = [f"<h1>modelshrink search {escape(search['id'])}</h1>",
                f"<p>status <b>{escape(search['status'])}</b>; objective <b>{escape(request['objective'])}</b> with {escape(constraint)}; "
                f"budget {escape(_fmt(request['budget_minutes']))} minutes; {len(candidates)} candidates</p>"]
    if search.get("reason"):
        sections.append(f"<p>{escape(search['reason'])}</p>")
    if search.get("error"):
        sections.append(f'<p style="color:{COLOURS["warn"]}">error <b>{escape(search["error"]["code"])}</b>: {escape(search["error"]["message"])}</p>')
    chosen = next((c for c in candidates if c["job_id"] == best), None)
    m = _point(chosen) if chosen else None
    if chosen and m is not None:
        sections.append(f'<p class="best">best: <b>{escape(str(chosen["recipe"]))}</b> (job <code>{escape(best or "")}</code>): '
                        f'{_fmt(m.compression_ratio)}x smaller, {_fmt(m.speedup)}x the speed, {_quality_words(m, quality)}</p>')
        on_front = [(c, p) for c in candidates if c["job_id"] in front and (p := _point(c)) is not None]
        sections.append(_bars("size ratio of the best and of the Pareto front",
                              [(str(c["recipe"]), p.compression_ratio, "chosen" if c["job_id"] == best else "compressed") for c, p in on_front], "x"))
    elif search["status"] != "running":
        sections.append(f'<p style="color:{COLOURS["warn"]}">no candidate met the constraint; closest: {escape(", ".join(search.get("closest") or []))}</p>')
    sections.append(_pareto_scatter(f"size ratio against {quality}", "compression_ratio", lambda p: p.compression_ratio, candidates, front, best, quality))
    sections.append(_pareto_scatter(f"speedup against {quality}", "speedup", lambda p: p.speedup, candidates, front, best, quality))
    sections.append(_table(candidates, front, best))
    body = "\n".join(s for s in sections if s)
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>modelshrink search report</title>"
            "<style>body{font-family:sans-serif;max-width:760px;margin:2em auto}svg{display:block;margin:1em 0}"
            "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}</style></head>"
            f"<body>{body}</body></html>")
