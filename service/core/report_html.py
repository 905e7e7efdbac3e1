"""A job's report as one self-contained HTML page (inline SVG, no scripts, no external files): what a
platform team shows. Before/after bars (size, latency per batch size, accuracy or fidelity), the
warnings in words, per step: per-layer bars (sparsity, width, rank, bits, sensitivity, whatever the
step reported), training curves, and quantize's candidates as a size-vs-speed scatter with the
chosen one marked.

Rendered from the job's stored metrics on request; written by hand because it is a few SVG shapes
(a plotting library would add a dependency the API does not otherwise need). Every text is escaped.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Any

from service.core.methods.common import StepReport
from service.core.methods.quantize import QuantizeCandidate, QuantizeReport

if TYPE_CHECKING:
    from service.core.job_metrics import JobMetrics

WIDTH = 640
BAR_HEIGHT = 18
COLOURS = {"original": "#8c8c8c", "compressed": "#2b7bb9", "chosen": "#d95f02", "point": "#2b7bb9", "warn": "#b2182b"}


def fmt(value: Any) -> str:
    # Three significant figures: a fourth on a latency is timing noise.
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _duration(job: dict[str, Any]) -> str | None:
    from datetime import datetime

    start, end = job.get("started_at"), job.get("finished_at")
    if not start or not end:
        return None
    def parse(value: Any) -> datetime:
        return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))

    seconds = (parse(end) - parse(start)).total_seconds()
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def bars(title: str, rows: list[tuple[str, float | None, str]], unit: str = "") -> str:
    """Horizontal bars: (label, value, colour key); values of None are listed as n/a."""
    present = [v for _, v, _ in rows if v is not None]
    if not present:
        return ""
    top = max(max(present), 1e-12)
    height = 28 + len(rows) * (BAR_HEIGHT + 6)
    parts = [f'<svg class="bars" role="img" aria-label="{escape(title)}" width="{WIDTH}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="0" y="16" font-weight="bold">{escape(title)}</text>']
    for i, (label, value, colour) in enumerate(rows):
        y = 28 + i * (BAR_HEIGHT + 6)
        parts.append(f'<text x="0" y="{y + 13}" font-size="12">{escape(label[:38])}</text>')
        if value is None:
            parts.append(f'<text x="250" y="{y + 13}" font-size="12">n/a</text>')
            continue
        length = max(1.0, (WIDTH - 360) * value / top)
        parts.append(f'<rect x="250" y="{y}" width="{length:.1f}" height="{BAR_HEIGHT}" fill="{COLOURS.get(colour, colour)}"/>')
        parts.append(f'<text x="{255 + length:.1f}" y="{y + 13}" font-size="12">{escape(fmt(value))}{escape(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _curve(title: str, values: list[float]) -> str:
    points = [v for v in values if isinstance(v, (int, float))]
    if len(points) < 2:
        return ""
    low, high = min(points), max(points)
    span = (high - low) or 1.0
    w, h = WIDTH - 80, 120
    coords = " ".join(f"{40 + w * i / (len(points) - 1):.1f},{20 + h * (1 - (v - low) / span):.1f}" for i, v in enumerate(points))
    return (f'<svg class="curve" role="img" aria-label="{escape(title)}" width="{WIDTH}" height="{h + 50}" xmlns="http://www.w3.org/2000/svg">'
            f'<text x="0" y="14" font-weight="bold">{escape(title)}</text>'
            f'<polyline points="{coords}" fill="none" stroke="{COLOURS["compressed"]}" stroke-width="2"/>'
            f'<text x="0" y="{h + 40}" font-size="11">{escape(fmt(low))} .. {escape(fmt(high))} over {len(points)} points</text></svg>')


def _scatter(title: str, candidates: list[QuantizeCandidate], chosen: str | None) -> str:
    """Quantize candidates: compression ratio (x) against speedup at the first batch size (y)."""
    points = [(c.compression_ratio, c.first_speedup, c.candidate, c.candidate == chosen, c.meets_target)
              for c in candidates if c.compression_ratio and c.first_speedup]
    if not points:
        return ""
    max_x, max_y = max(p[0] for p in points) * 1.1, max(p[1] for p in points) * 1.1
    w, h = WIDTH - 80, 220
    parts = [f'<svg class="scatter" role="img" aria-label="{escape(title)}" width="{WIDTH}" height="{h + 60}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="0" y="14" font-weight="bold">{escape(title)}</text>',
             f'<line x1="40" y1="{20 + h}" x2="{40 + w}" y2="{20 + h}" stroke="#333"/><line x1="40" y1="20" x2="40" y2="{20 + h}" stroke="#333"/>',
             f'<text x="{40 + w - 120}" y="{h + 40}" font-size="11">size ratio (x) →</text><text x="44" y="30" font-size="11">speedup ↑</text>']
    for fraction in (0.0, 0.5, 1.0):  # axis values
        parts.append(f'<text x="{40 + w * fraction:.1f}" y="{h + 32}" font-size="10" text-anchor="middle">{max_x * fraction:.2g}x</text>')
        parts.append(f'<text x="36" y="{20 + h * (1 - fraction) + 4:.1f}" font-size="10" text-anchor="end">{max_y * fraction:.2g}x</text>')
    for x, y, name, is_chosen, meets in points:
        cx, cy = 40 + w * x / max_x, 20 + h * (1 - y / max_y)
        colour = COLOURS["chosen"] if is_chosen else (COLOURS["point"] if meets else COLOURS["original"])
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{7 if is_chosen else 4}" fill="{colour}"><title>{escape(name)}: {x:.2f}x smaller, {y:.2f}x faster</title></circle>')
    parts.append(f'<text x="40" y="{h + 55}" font-size="11">orange: kept; blue: met the quality target; grey: missed it</text></svg>')
    return "".join(parts)


def _summary(metrics: JobMetrics) -> list[str]:
    """The job's headline, its warnings and the before/after bars."""
    original, compressed, evaluation = metrics.original, metrics.compressed, metrics.evaluation
    batch = original.latency_ms.batch if original.latency_ms is not None else None
    sections = [f"<p>{fmt(metrics.compression_ratio)}x smaller, {fmt(metrics.speedup)}x the speed at batch {escape(fmt(batch))}; measured on "
                f"{escape(fmt(evaluation and evaluation.data))} ({escape(fmt(evaluation and evaluation.samples))} samples, "
                f"{escape(fmt(evaluation and evaluation.runtime))})</p>"]
    if evaluation is not None and evaluation.positions:
        sections.append(f"<p>{escape(evaluation.positions)}</p>")
    if evaluation is not None and evaluation.fixed_batch:
        sections.append(f"<p>the model's batch is fixed at {evaluation.fixed_batch} (exported without dynamic axes): every run used batches of that size</p>")
    if metrics.warnings:
        sections.append("<ul class=\"warnings\">" + "".join(f'<li style="color:{COLOURS["warn"]}">{escape(w)}</li>' for w in metrics.warnings) + "</ul>")
    else:
        sections.append("<p>No warnings: not worse than the original on any measured axis.</p>")
    sections.append(bars("size (MB)", [("original", original.size_bytes / 1e6, "original"), ("compressed", compressed.size_bytes / 1e6, "compressed")]))
    if original.llm is not None and compressed.llm is not None:
        from service.core.llm_report_html import llm_sections  # it builds on this module's bars

        sections.extend(llm_sections(original.llm, compressed.llm))
    for o, c in zip(original.latency_by_batch, compressed.latency_by_batch):
        sections.append(bars(f"p50 latency at batch {o.batch} (ms)", [("original", o.p50, "original"), ("compressed", c.p50, "compressed")]))
    if original.accuracy is not None:
        sections.append(bars("accuracy", [("original", original.accuracy, "original"), ("compressed", compressed.accuracy, "compressed")]))
    if compressed.fidelity is not None:
        sections.append(bars("fidelity to the original", [("cosine", compressed.fidelity.cosine, "compressed"),
                                                          ("top-1 agreement", compressed.fidelity.top1_agreement, "compressed")]))
    if metrics.sensitivity:
        sections.append(bars("layers most responsible for the loss (cosine drop)", [(r.layer, r.drop, "warn") for r in metrics.sensitivity[:10]]))
    return sections


def _step_sections(step: StepReport, llm: bool) -> list[str]:
    """One step's report: the candidates (quantize), then the per-layer bars and training curves its
    method's report model says it has (StepReport.per_layer / curves)."""
    from service.core.llm_report_html import llm_step_sections

    sections = [f"<h2>step {step.index + 1}: {escape(str(step.method))}</h2>"]
    if isinstance(step, QuantizeReport):
        if llm:
            sections.extend(llm_step_sections(step))
        elif step.candidates:
            sections.append(_scatter("quantize candidates", step.candidates, step.chosen))
            sections.append(f"<p>kept <b>{escape(fmt(step.chosen))}</b>: {escape(fmt(step.reason))}</p>")
    layers = step.per_layer()
    if layers is not None:
        sections.append(bars(layers.title, [(name, value, "compressed") for name, value in layers.values]))
    sections.extend(_curve(curve.title, curve.values) for curve in step.curves())
    return sections


def render(job: dict[str, Any]) -> str:
    import json

    from service.core.job_metrics import JobMetrics

    metrics = JobMetrics.model_validate(job["metrics"]) if job.get("metrics") else None
    took = _duration(job)
    inputs = f"model {job.get('model_id')}" + (f", dataset {job['dataset_id']}" if job.get("dataset_id") else "") \
        + (f", evaluation dataset {job['eval_dataset_id']}" if job.get("eval_dataset_id") else "")
    sections = [f"<h1>modelshrink job {escape(job['id'])}</h1>",
                f"<p>status <b>{escape(job['status'])}</b>{escape(f' after {took}' if took else '')}; {escape(inputs)}</p>",
                f"<p>steps: <code>{escape(json.dumps(job.get('steps', [])))}</code></p>"]
    artifacts = job.get("artifacts") or []
    if artifacts:
        sections.append("<p>artifacts: " + ", ".join(f"{escape(a['name'])} ({a['size_bytes']:,} bytes)" for a in artifacts)
                        + f" - download with <code>GET /v1/jobs/{escape(job['id'])}/artifacts/NAME</code> or <code>modelshrink download</code></p>")
    if job.get("error"):
        sections.append(f'<p style="color:{COLOURS["warn"]}">error <b>{escape(job["error"]["code"])}</b>: {escape(job["error"]["message"])}</p>')
    if metrics is not None:
        sections.extend(_summary(metrics))
        llm = metrics.original.llm is not None
        for step in metrics.step_reports:
            sections.extend(_step_sections(step, llm))
    body = "\n".join(s for s in sections if s)
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>modelshrink job report</title>"
            "<style>body{font-family:sans-serif;max-width:700px;margin:2em auto}svg{display:block;margin:1em 0}</style></head>"
            f"<body>{body}</body></html>")
