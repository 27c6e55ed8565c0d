"""The end of an offline run: the summary a person reads, ``summary.json`` and ``report.html``.

Offline users have no ClearML web UI, so ``report.html`` shows what the UI would: the headline numbers
and the gate verdict, per-class AP, the PR curves, the confusion matrix and predicted images beside
their raw images. It is built from the offline ClearML sessions themselves (each step's
``metrics.jsonl`` and the debug images ClearML stored in it), so it shows exactly the figures a
server would have received. It is one self-contained file: images are embedded, nothing is fetched.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2ops.utils.jsonio import write_json
from d2ops.utils.offline_session import session_file

__all__ = ["SessionFigures", "format_summary", "read_session", "summarize", "write_outputs", "write_report"]

_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


@dataclass
class SessionFigures:
    """The plots and debug images one offline ClearML session holds (ClearML's own event records)."""

    plots: list[dict[str, Any]] = field(default_factory=list)  # {"title", "series", "figure": plotly dict}
    images: list[dict[str, Any]] = field(default_factory=list)  # {"title", "series", "data": bytes}


def read_session(session: str | Path | None) -> SessionFigures:
    """Plots and debug images from a session's ``metrics.jsonl`` (what ClearML replays into a server).

    ``session`` is the session's zip (what d2ops keeps) or its folder. A debug image's bytes sit at
    ``data/<event key>`` in it, where ``Task.import_offline_session`` looks for them too.
    """
    figures = SessionFigures()
    if not session or not Path(session).exists():
        return figures
    events = session_file(session, "metrics.jsonl")
    if events is None:
        return figures
    for line in events.decode().splitlines():
        for event in json.loads(line):
            kind, title, series = event.get("type"), event.get("metric", ""), event.get("variant", "")
            if kind == "plot":
                figures.plots.append({"title": title, "series": series, "figure": json.loads(event["plot_str"])})
            elif kind == "training_debug_image" and event.get("key"):
                data = session_file(session, f"data/{event['key']}")
                if data is not None:
                    figures.images.append({"title": title, "series": series, "data": data})
    return figures


def summarize(run: Any, seconds: float) -> dict[str, Any]:
    """``summary.json``: headline metrics, the gate verdicts, the bundle and the offline sessions."""
    metrics = run.steps["evaluate"].values
    register = run.steps["register"].values
    return {
        "bbox": {**metrics["bbox"], "per_class": metrics["per_class_ap"]},
        "segm": metrics.get("segm") or None,  # a segmenting model's mask AP; null for a box model
        "f2": metrics.get("f2", metrics["f_beta"]),
        "precision": metrics["precision"],
        "recall": metrics["recall"],
        "score_threshold": metrics["score_threshold"],
        "quality_gate": register["gate"],
        "champion_gate": register.get("champion_gate"),
        "model_bundle": register["bundle"],
        "model_registration": register["registration"],
        "predictions": run.steps["infer"].values.get("predictions_json"),
        "inference_runtime": run.steps["infer"].values.get("runtime"),
        "inference_seconds_per_image": run.steps["infer"].values.get("seconds_per_image"),
        "clearml_sessions": run.sessions,
        "train_seconds": run.steps["train"].values.get("seconds"),
        "device": run.steps["train"].values.get("device"),
        "total_seconds": round(seconds, 1),
    }


def _num(value: Any, digits: int = 1) -> str:
    """A number for people: ``n/a`` where it was not measured (null in the JSON)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def format_summary(summary: dict[str, Any], path: Path, report: Path | None = None, title: str = "d2ops") -> str:
    """The lines printed at the end of an offline run."""
    bbox = summary["bbox"]
    per_class = ", ".join(f"{k} {_num(v)}" for k, v in bbox["per_class"].items())
    gate = summary["quality_gate"]
    lines = [
        "",
        f"{title}: offline pipeline finished",
        f"  bbox AP {_num(bbox.get('AP'))}  AP50 {_num(bbox.get('AP50'))}  AP75 {_num(bbox.get('AP75'))}"
        f"   per class: {per_class}",
        *(
            [f"  segm AP {_num(segm.get('AP'))}  AP50 {_num(segm.get('AP50'))}  AP75 {_num(segm.get('AP75'))}"]
            if (segm := summary.get("segm"))
            else []
        ),
        f"  precision {_num(summary['precision'], 3)}  recall {_num(summary['recall'], 3)}"
        f"  F2 {_num(summary['f2'], 3)}  (score >= {summary['score_threshold']})",
        f"  quality gate {gate['metric']} >= {gate['min_value']}: {'PASSED' if gate['passed'] else 'FAILED'}",
        *_champion_line(summary.get("champion_gate")),
        f"  model bundle      {summary['model_bundle']}",
        f"  predictions       {summary['predictions']}"
        + (
            f"  ({runtime}, {_num(summary.get('inference_seconds_per_image'), 3)} s/image)"
            if (runtime := summary.get("inference_runtime"))
            else ""
        ),
        "  ClearML offline sessions (import each with Task.import_offline_session(<zip>)):",
        *(f"    {step:<9} {session}" for step, session in summary["clearml_sessions"].items()),
        f"  trained on {summary['device']} in {_num(summary['train_seconds'], 0)} s;"
        f" total {_num(summary['total_seconds'], 0)} s",
        f"  summary written to {path}",
        *([f"  report written to  {report}"] if report else []),
    ]
    return "\n".join(lines)


def _champion_line(decision: dict[str, Any] | None) -> list[str]:
    if not decision:
        return []
    verdict = "PROMOTED to production" if decision.get("promote") else "not promoted"
    return [f"  champion/challenger: {verdict} ({decision.get('reason', '')})"]


def write_outputs(run: Any, out_dir: Path, seconds: float, *, debug_images: int = 8) -> tuple[dict[str, Any], Path]:
    """Write ``summary.json`` and ``report.html`` into ``out_dir``; returns the summary and the report path."""
    summary = summarize(run, seconds)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "summary.json", summary)
    report = write_report(out_dir / "report.html", summary, debug_images=debug_images)
    return summary, report


# --------------------------------------------------------------------------- report.html


def write_report(path: Path, summary: Mapping[str, Any], *, debug_images: int = 8) -> Path:
    """Write ``report.html`` for a run's summary, from the figures in its offline sessions."""
    sessions = summary.get("clearml_sessions") or {}
    evaluate, infer = read_session(sessions.get("evaluate")), read_session(sessions.get("infer"))
    parts = [
        _headline(summary),
        _per_class(summary["bbox"].get("per_class") or {}),
        _pr_curves([p for p in evaluate.plots if _trace_type(p) == "scatter"]),
        *(_heatmap(p) for p in evaluate.plots if _trace_type(p) == "heatmap"),
        _debug_images(infer.images, debug_images),
    ]
    page = (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>d2ops report</title><style>"
        "body{font:14px system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
        "figure{display:inline-block;margin:4px}figcaption{font-size:12px}img{max-width:320px}"
        ".pass{color:#080}.fail{color:#b00}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path


def _e(value: Any) -> str:
    return html.escape(str(value))


def _headline(summary: Mapping[str, Any]) -> str:
    bbox, gate = summary["bbox"], summary["quality_gate"]
    verdict = "PASSED" if gate["passed"] else "FAILED"
    rows = [
        ("bbox AP / AP50 / AP75", f"{_num(bbox.get('AP'))} / {_num(bbox.get('AP50'))} / {_num(bbox.get('AP75'))}"),
        ("APs / APm / APl", f"{_num(bbox.get('APs'))} / {_num(bbox.get('APm'))} / {_num(bbox.get('APl'))}"),
        *(
            [("segm AP / AP50 / AP75", f"{_num(segm.get('AP'))} / {_num(segm.get('AP50'))} / {_num(segm.get('AP75'))}")]
            if (segm := summary.get("segm"))
            else []
        ),
        (
            f"precision / recall / F2 (score >= {summary['score_threshold']})",
            f"{_num(summary['precision'], 3)} / {_num(summary['recall'], 3)} / {_num(summary['f2'], 3)}",
        ),
        ("model bundle", summary["model_bundle"]),
    ]
    champion = summary.get("champion_gate") or {}
    body = "".join(f"<tr><th>{_e(k)}</th><td style=text-align:left>{_e(v)}</td></tr>" for k, v in rows)
    gate_line = (
        f"<p>Quality gate {_e(gate['metric'])} &ge; {_e(gate['min_value'])}: "
        f"<b class={'pass' if gate['passed'] else 'fail'}>{verdict}</b>"
        + (f"; champion/challenger: {_e(champion.get('reason', ''))}" if champion else "")
        + "</p>"
    )
    return f"<h1>d2ops run report</h1>{gate_line}<table>{body}</table>"


def _per_class(per_class: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><td style=text-align:left>{_e(name)}</td><td>{_num(ap)}</td></tr>" for name, ap in per_class.items()
    )
    return f"<h2>Per-class AP</h2><table><tr><th>class</th><th>bbox AP</th></tr>{rows}</table>"


def _pr_curves(plots: list[dict[str, Any]], width: int = 520, height: int = 360, pad: int = 40) -> str:
    """The PR curves (one plotly scatter per class) drawn as one SVG chart, recall 0..1 by precision 0..1."""
    if not plots:
        return "<h2>PR curves</h2><p>No detections: no curve.</p>"

    def xy(x: float, y: float) -> str:
        return f"{pad + x * (width - 2 * pad):.1f},{height - pad - y * (height - 2 * pad):.1f}"

    lines, legend = [], []
    for i, plot in enumerate(plots):
        trace, color = plot["figure"]["data"][0], _PALETTE[i % len(_PALETTE)]
        points = " ".join(xy(float(x), float(y)) for x, y in zip(trace["x"], trace["y"], strict=True))
        lines.append(
            f'<polyline class=pr data-series="{_e(plot["series"])}" fill=none stroke="{color}" points="{points}"/>'
        )
        legend.append(f'<text x="{width - pad + 5}" y="{pad + 16 * i}" fill="{color}">{_e(plot["series"])}</text>')
    axes = (
        f"<line x1={pad} y1={height - pad} x2={width - pad} y2={height - pad} stroke=black />"
        f"<line x1={pad} y1={pad} x2={pad} y2={height - pad} stroke=black />"
        f'<text x="{width / 2}" y="{height - 8}">recall</text>'
        f'<text x="4" y="{pad - 10}">precision</text>'
        f'<text x="{pad - 4}" y="{height - pad + 14}">0</text>'
        f'<text x="{width - pad - 4}" y="{height - pad + 14}">1</text>'
        f'<text x="{pad - 14}" y="{pad + 4}">1</text>'
    )
    title = _e(plots[0]["title"])
    svg = f'<svg width="{width + 120}" height="{height}" role=img>{axes}{"".join(lines)}{"".join(legend)}</svg>'
    return f"<h2>{title}</h2>{svg}"


def _trace_type(plot: Mapping[str, Any]) -> str | None:
    """The kind of a plot's first trace; None for a plot with no trace (nothing to draw, not an error)."""
    traces = (plot.get("figure") or {}).get("data") or []
    return traces[0].get("type") if traces and isinstance(traces[0], dict) else None


def _heatmap(plot: dict[str, Any]) -> str:
    """A plotly heatmap (ClearML's confusion matrix) as a table, shaded by count."""
    trace = plot["figure"]["data"][0]
    z: list[list[Any]] = trace.get("z") or [[]]
    xs, ys = trace.get("x") or list(range(len(z[0]))), trace.get("y") or list(range(len(z)))
    layout = plot["figure"].get("layout", {})
    xlabel, ylabel = _axis_title(layout.get("xaxis")), _axis_title(layout.get("yaxis"))
    top = max((float(v) for row in z for v in row), default=0.0) or 1.0
    head = "".join(f"<th>{_e(x)}</th>" for x in xs)
    rows = []
    for label, row in zip(ys, z, strict=True):
        cells = "".join(
            f'<td style="background:rgba(31,119,180,{float(v) / top:.2f})">{_e(_count(v))}</td>' for v in row
        )
        rows.append(f"<tr><th>{_e(label)}</th>{cells}</tr>")
    return (
        f"<h2>{_e(plot['title'])}</h2><p>rows: {_e(ylabel)}; columns: {_e(xlabel)}</p>"
        f"<table class=confusion><tr><th></th>{head}</tr>{''.join(rows)}</table>"
    )


def _axis_title(axis: Any) -> str:
    title = (axis or {}).get("title", "")
    return title.get("text", "") if isinstance(title, dict) else str(title)


def _count(value: Any) -> str:
    number = float(value)
    return str(int(number)) if number.is_integer() else f"{number:g}"


def _debug_images(images: Iterable[dict[str, Any]], limit: int) -> str:
    """Each image's raw and predicted versions side by side, embedded (the report is one file)."""
    pairs: dict[str, dict[str, bytes]] = {}
    for image in images:
        name, _, kind = image["series"].rpartition(" ")
        pairs.setdefault(name or image["series"], {})[kind] = image["data"]
    figures = []
    for name, pair in list(pairs.items())[:limit]:
        cells = "".join(
            f'<figure><img alt="{_e(name)} {kind}" src="data:image/jpeg;base64,'
            f'{base64.b64encode(pair[kind]).decode()}"><figcaption>{_e(kind)}</figcaption></figure>'
            for kind in ("raw", "predictions")
            if kind in pair
        )
        figures.append(f"<div class=pair><h3>{_e(name)}</h3>{cells}</div>")
    body = "".join(figures) or "<p>No debug images (inference.debug_images is 0).</p>"
    return f"<h2>Predictions</h2>{body}"
