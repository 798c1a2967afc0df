"""report.html and plots/*.png: the per-round report (fedserver/report.py) as a page a person reads.

The page is one self-contained file (inline CSS, the plots embedded as PNG data URIs, no
JavaScript); the same PNGs are written beside it in plots/. Plots are drawn with matplotlib's
Figure API on the Agg canvas: no pyplot, no global state. Every text from the state (school
ids, failure reasons: they come from the network) is escaped."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

# matplotlib keeps a font cache under $HOME/.config; a service user's home is its state dir.
os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), f"schoolfed-matplotlib-{os.getuid()}"))

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

Points = list[tuple[int, float]]

NOT_SCHOOLS = ("server", "teacher")   # eval sources that are not a school
KIND_COLOURS = {"train": "#1f77b4", "distill": "#ff7f0e", "teach": "#2ca02c", "evaluate": "#9467bd"}
OTHER_KIND = "#7f7f7f"
FAILED = "#d62728"
SCHOOL_COLOURS = ("#2ca02c", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#aec7e8")
PLOTS = ("accuracy", "loss", "bytes", "seconds")
FIGSIZE = (8.0, 4.2)   # inches; at DPI 110: 880 x 462 pixels
DPI = 110


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _num(v: Any) -> float | None:
    """A plottable number, or None (missing, not a number, NaN)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if math.isnan(v) else float(v)


def _points(pairs: Iterable[tuple[int, Any]]) -> Points:
    return [(int(n), y) for n, v in pairs if (y := _num(v)) is not None]


def accuracy_series(report: Mapping[str, Any], evals: Iterable[Mapping[str, Any]] | None = None) -> dict[str, Points]:
    """Held-out accuracy by round, keyed by eval source: "server" (the coordinator's eval set;
    round 0 = the base model), "teacher" (round 0 = before it learned, then after each teach
    round) when there is one, and each school's id (its own held-out questions; from
    `store.evals()` rows). Missing evaluations are left out, not zero."""
    out: dict[str, Points] = {}
    server = _points([(0, report.get("base_eval_accuracy"))] + [(r["round"], r.get("eval_accuracy")) for r in report["rounds"]])
    if server:
        out["server"] = server
    t = report.get("teacher")
    if t:
        teacher = _points([(0, (t.get("before") or {}).get("accuracy"))]
                          + [(a["round"], a.get("accuracy")) for a in t.get("after_teach_rounds", [])])
        if teacher:
            out["teacher"] = teacher
    schools: dict[str, Points] = {}
    for e in evals or ():
        if e["source"] in NOT_SCHOOLS:
            continue
        y = _num((e.get("metrics") or {}).get("accuracy"))
        if y is not None:
            schools.setdefault(str(e["source"]), []).append((int(e["round"]), y))
    for school in sorted(schools):
        out[school] = sorted(schools[school])
    return out


def loss_series(report: Mapping[str, Any]) -> dict[str, Points]:
    """Loss by round: "server" (held-out; round 0 = the base model), "schools" (the schools'
    own held-out questions, weighted by their sizes), "train" (the round's training loss)."""
    rounds = report["rounds"]
    out = {
        "server": _points([(0, report.get("base_eval_loss"))] + [(r["round"], r.get("eval_loss")) for r in rounds]),
        "schools": _points((r["round"], r.get("school_eval_loss")) for r in rounds),
        "train": _points((r["round"], r.get("train_loss")) for r in rounds),
    }
    return {k: v for k, v in out.items() if v}


def _label(text: str, limit: int = 40) -> str:
    """A legend label from outside text: no mathtext ($), not hidden (a leading _), not too long."""
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    text = text.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _failed_rounds(report: Mapping[str, Any]) -> list[int]:
    return [int(r["round"]) for r in report["rounds"] if r.get("status") == "failed"]


def _new_figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)   # Agg, explicitly: no display needed
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.set_axisbelow(True)   # bars over the grid
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _mark_failed(ax: Any, failed: list[int]) -> None:
    for i, n in enumerate(failed):
        ax.axvspan(n - 0.4, n + 0.4, color=FAILED, alpha=0.12, lw=0, label="failed round" if i == 0 else None)


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def accuracy_figure(report: Mapping[str, Any], evals: Iterable[Mapping[str, Any]] | None = None) -> Figure | None:
    series = accuracy_series(report, evals)
    if not series:
        return None
    fig, ax = _new_figure("Held-out accuracy by round (round 0: before any training)", "round", "accuracy (fraction correct)")
    _mark_failed(ax, _failed_rounds(report))
    schools = [k for k in series if k not in NOT_SCHOOLS]
    for i, school in enumerate(schools):
        xs, ys = zip(*series[school])
        ax.plot(xs, ys, ls="--", lw=1.2, marker="o", ms=4, color=SCHOOL_COLOURS[i % len(SCHOOL_COLOURS)],
                label=_label(f"{school} (own held-out)"))
    if "teacher" in series:
        xs, ys = zip(*series["teacher"])
        ax.plot(xs, ys, lw=2, marker="s", ms=6, color="#9467bd", label="teacher (coordinator's eval set)")
    if "server" in series:
        xs, ys = zip(*series["server"])
        ax.plot(xs, ys, lw=2.5, marker="o", ms=6, color="#1f77b4", label="global adapter (coordinator's eval set)")
    _legend(ax)
    return fig


def loss_figure(report: Mapping[str, Any]) -> Figure | None:
    series = loss_series(report)
    if not series:
        return None
    fig, ax = _new_figure("Loss by round", "round", "loss (mean negative log-likelihood)")
    _mark_failed(ax, _failed_rounds(report))
    style = {"server": ("-", "o", "#1f77b4", "held-out (coordinator's eval set)"),
             "schools": ("--", "^", "#2ca02c", "held-out (schools' own, weighted)"),
             "train": (":", "D", "#ff7f0e", "training (schools' local steps)")}
    for key, points in series.items():
        ls, marker, colour, label = style[key]
        xs, ys = zip(*points)
        ax.plot(xs, ys, ls=ls, marker=marker, ms=5, lw=2, color=colour, label=label)
    _legend(ax)
    return fig


def _round_ticks(ax: Any, rounds: list[int]) -> None:
    if len(rounds) <= 30:
        ax.set_xticks(rounds)
    ax.set_ylim(bottom=0)


def bytes_figure(report: Mapping[str, Any]) -> Figure | None:
    rounds = report["rounds"]
    if not rounds:
        return None
    fig, ax = _new_figure("Bytes moved by round", "round", "MB (10⁶ bytes)")
    ns = [int(r["round"]) for r in rounds]
    failed = set(_failed_rounds(report))
    for offset, key, colour, label in ((-0.2, "bytes_up", "#4c72b0", "up (schools → coordinator)"),
                                       (0.2, "bytes_down", "#dd8452", "down (coordinator → schools)")):
        ax.bar([n + offset for n in ns], [(_num(r.get(key)) or 0.0) / 1e6 for r in rounds], width=0.4, color=colour, label=label,
               hatch=["//" if n in failed else "" for n in ns], edgecolor=[FAILED if n in failed else colour for n in ns])
    handles = ax.get_legend_handles_labels()[0]
    if failed:
        handles.append(Patch(facecolor="white", edgecolor=FAILED, hatch="//", label="failed round"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    _round_ticks(ax, ns)
    return fig


def _kind_order(kind: str) -> tuple[int, str]:
    order = list(KIND_COLOURS)
    return (order.index(kind) if kind in order else len(order), kind)


def seconds_figure(report: Mapping[str, Any]) -> Figure | None:
    rounds = report["rounds"]
    if not rounds:
        return None
    fig, ax = _new_figure("Round time by round, coloured by kind", "round", "seconds")
    ns = [int(r["round"]) for r in rounds]
    kinds = [str(r.get("kind") or "train") for r in rounds]
    failed = set(_failed_rounds(report))
    colours = [KIND_COLOURS.get(k, OTHER_KIND) for k in kinds]
    secs = [_num(r.get("seconds")) for r in rounds]
    ax.bar(ns, [s or 0.0 for s in secs], width=0.7, color=colours,
           hatch=["//" if n in failed else "" for n in ns], edgecolor=[FAILED if n in failed else c for n, c in zip(ns, colours)])
    missing = [n for n, s in zip(ns, secs) if s is None]
    handles: list[Any] = [Patch(color=KIND_COLOURS.get(k, OTHER_KIND), label=_label(k)) for k in sorted(set(kinds), key=_kind_order)]
    if missing:
        (line,) = ax.plot(missing, [0.0] * len(missing), ls="", marker="x", ms=8, color="black", label="time not recorded")
        handles.append(line)
    if failed:
        handles.append(Patch(facecolor="white", edgecolor=FAILED, hatch="//", label="failed round"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    _round_ticks(ax, ns)
    return fig


def render_plots(report: Mapping[str, Any], evals: Iterable[Mapping[str, Any]] | None = None) -> dict[str, bytes]:
    """name -> PNG bytes, for the plots that have data (none before the first evaluation)."""
    evals = list(evals or ())
    makers: dict[str, Callable[[], Figure | None]] = {
        "accuracy": lambda: accuracy_figure(report, evals), "loss": lambda: loss_figure(report),
        "bytes": lambda: bytes_figure(report), "seconds": lambda: seconds_figure(report)}
    out = {}
    for name in PLOTS:
        fig = makers[name]()
        if fig is not None:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", metadata={"Software": None})
            out[name] = buf.getvalue()
    return out


# ---------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #555; margin-top: 0; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.3em 1.2em; } dt { font-weight: 600; } dd { margin: 0; }
table { border-collapse: collapse; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: right; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
tr.failed td { background: #fbeaea; } tr.open td { background: #fff8e1; }
td.reason { white-space: pre-wrap; word-break: break-word; max-width: 45em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
.none { color: #777; font-style: italic; }
"""

CAPTIONS = {
    "accuracy": "Held-out accuracy after each round. Round 0 is the base model (and the teacher before it learned). "
                "Dashed lines: each school's score on its own held-out questions. Shaded: failed rounds.",
    "loss": "Held-out loss (coordinator's eval set, and the schools' own, weighted by size) and the training loss "
            "the schools reported. Shaded: failed rounds.",
    "bytes": "Megabytes uploaded by the schools and downloaded by them in each round. Hatched: failed rounds.",
    "seconds": "Wall-clock seconds each round took, from opening at the schools to its commit or failure, coloured by round kind. Hatched: failed rounds.",
}


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _rounds_table(rounds: list[Mapping[str, Any]]) -> str:
    """The columns of report.format_table."""
    head = ("round", "kind", "status", "schools", "accuracy", "loss", "school acc", "train loss", "MB up", "MB down", "seconds")
    rows = []
    for r in rounds:
        participants = [str(p) for p in r.get("participants") or []]
        cells = [
            _e(r["round"]), _e(r.get("kind", "train")), _e(r.get("status", "")),
            f'<span title="{_e(", ".join(participants))}">{_e(r.get("accepted", 0))}/{len(participants)}</span>',
            _e(_f(_num(r.get("eval_accuracy")), ".3f")), _e(_f(_num(r.get("eval_loss")), ".3f")),
            _e(_f(_num(r.get("school_eval_accuracy")), ".3f")), _e(_f(_num(r.get("train_loss")), ".3f")),
            _e(f"{(_num(r.get('bytes_up')) or 0.0) / 1e6:.1f}"), _e(f"{(_num(r.get('bytes_down')) or 0.0) / 1e6:.1f}"),
            _e(_f(_num(r.get("seconds")), ".0f")),
        ]
        tds = "".join(f'<td class="text">{c}</td>' if i in (1, 2) else f"<td>{c}</td>" for i, c in enumerate(cells))
        status = str(r.get("status", ""))
        rows.append(f'<tr class="{_e(status)}">{tds}</tr>')
    ths = "".join(f'<th class="text">{h}</th>' if i in (1, 2) else f"<th>{h}</th>" for i, h in enumerate(head))
    return f'<table id="rounds">\n<thead><tr>{ths}</tr></thead>\n<tbody>\n' + "\n".join(rows) + "\n</tbody>\n</table>"


def _failures(rounds: list[Mapping[str, Any]]) -> str:
    rows = [f'<tr><td>{_e(r["round"])}</td><td class="text">{_e(r.get("kind", "train"))}</td><td class="text">{_e(r.get("status", ""))}</td>'
            f'<td class="text">{_e(school)}</td><td class="text reason">{_e(reason)}</td></tr>'
            for r in rounds for school, reason in sorted((r.get("failures") or {}).items())]
    if not rows:
        return '<p class="none">No school failed in any round.</p>'
    return ('<table id="failures">\n<thead><tr><th>round</th><th class="text">kind</th><th class="text">round status</th>'
            '<th class="text">school (or step)</th><th class="text">reason</th></tr></thead>\n<tbody>\n' + "\n".join(rows) + "\n</tbody>\n</table>")


def _teacher(t: Mapping[str, Any] | None) -> str:
    if not t:
        return ""
    name = _e(t.get("model") or "(model not recorded in the state)")
    quant = f" ({_e(t['quantization'])})" if t.get("quantization") else ""
    before = t.get("before") or {}
    items = [f"<dt>model</dt><dd>{name}{quant}</dd>",
             f"<dt>held-out questions</dt><dd>{_e(t.get('eval_count', 0))}</dd>",
             f"<dt>before it learned</dt><dd>accuracy {_e(_f(_num(before.get('accuracy')), '.3f'))}, "
             f"loss {_e(_f(_num(before.get('loss')), '.3f'))}</dd>"]
    items += [f"<dt>after teach round {_e(a['round'])}</dt><dd>accuracy {_e(_f(_num(a.get('accuracy')), '.3f'))}, "
              f"loss {_e(_f(_num(a.get('loss')), '.3f'))}</dd>" for a in t.get("after_teach_rounds", [])]
    return "<h2>Teacher</h2>\n<dl>" + "".join(items) + "</dl>"


def _ood(o: Mapping[str, Any] | None) -> str:
    if not o:
        return ""
    return (f"<h2>Out-of-distribution</h2>\n<p>{_e(o.get('count', 0))} questions from {_e(o.get('source', ''))}, a source no "
            f"school trains on: base model accuracy {_e(_f(_num(o.get('base_accuracy')), '.3f'))}, round {_e(o.get('round', ''))} "
            f"adapter {_e(_f(_num(o.get('adapter_accuracy')), '.3f'))}.</p>")


def render_html(report: Mapping[str, Any], plots: Mapping[str, bytes]) -> str:
    rounds = list(report["rounds"])
    ev = report.get("eval_set") or {}
    committed = sum(1 for r in rounds if r.get("status") == "committed")
    failed = sum(1 for r in rounds if r.get("status") == "failed")
    summary = [
        f"<dt>model</dt><dd>{_e(report.get('model') or '(not recorded in the state)')}</dd>",
        f"<dt>eval set</dt><dd>{_e(ev.get('name') or 'the coordinator’s held-out questions')}: {_e(ev.get('count', 0))} questions</dd>",
        f"<dt>base model</dt><dd>accuracy {_e(_f(_num(report.get('base_eval_accuracy')), '.3f'))}, "
        f"loss {_e(_f(_num(report.get('base_eval_loss')), '.3f'))}</dd>",
        f"<dt>rounds</dt><dd>{len(rounds)} ({committed} committed, {failed} failed)</dd>",
    ]
    if _num(report.get("seconds_total")) is not None:
        summary.append(f"<dt>total time</dt><dd>{_e(_f(_num(report['seconds_total']), '.0f'))} s</dd>")
    if rounds:
        table = _rounds_table(rounds)
        fails = _failures(rounds)
    else:
        table = '<p class="none">No rounds yet.</p>'
        fails = '<p class="none">No rounds yet.</p>'
    figures = []
    for name, png in plots.items():
        data = base64.b64encode(png).decode("ascii")
        figures.append(f'<figure id="plot-{name}"><img alt="{_e(name)} plot" src="data:image/png;base64,{data}">\n'
                       f'<figcaption>{_e(CAPTIONS[name])} <a href="plots/{name}.png">plots/{name}.png</a></figcaption></figure>')
    plots_html = "\n".join(figures) or '<p class="none">Nothing to plot yet: no evaluation and no round recorded.</p>'
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>School federation report</title>
<style>{CSS}</style>
</head>
<body>
<h1>School federation report</h1>
<p class="meta">Generated {_e(generated)} from the coordinator's state.</p>
<dl>{"".join(summary)}</dl>
{_teacher(report.get("teacher"))}
{_ood(report.get("ood"))}
<h2>Rounds</h2>
{table}
<h2>Plots</h2>
{plots_html}
<h2>Failures</h2>
{fails}
</body>
</html>
"""


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_html_report(report: Mapping[str, Any], out_dir: Path, evals: Iterable[Mapping[str, Any]] | None = None) -> Path:
    """Write out_dir/report.html and out_dir/plots/<name>.png; return the page's path.
    `evals`: `store.evals()` rows, for the per-school accuracy lines (without them the plot
    has the coordinator's and the teacher's evaluations only)."""
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots = render_plots(report, evals)
    for name in PLOTS:   # a plot without data this time does not leave an older one behind
        path = plots_dir / f"{name}.png"
        if name in plots:
            _write_atomic(path, plots[name])
        else:
            path.unlink(missing_ok=True)
    page = out_dir / "report.html"
    _write_atomic(page, render_html(report, plots).encode("utf-8"))
    return page


def carry_over(fresh: dict[str, Any], previous_file: Path) -> dict[str, Any]:
    """The state does not record the model names, the eval set's name or the demo's extras
    (`ood`, `seconds_total`, ...): keep them from an earlier report.json in the same place."""
    try:
        previous = json.loads(previous_file.read_text())
    except (OSError, ValueError):
        return fresh
    if not isinstance(previous, dict):
        return fresh
    out = dict(fresh)
    for key, value in previous.items():
        if key not in out:
            out[key] = value
    if not out.get("model") and isinstance(previous.get("model"), str):
        out["model"] = previous["model"]
    prev_eval = previous.get("eval_set")
    if isinstance(prev_eval, dict) and not out["eval_set"].get("name") and isinstance(prev_eval.get("name"), str):
        out["eval_set"] = {**out["eval_set"], "name": prev_eval["name"]}
    prev_t = previous.get("teacher")
    if isinstance(prev_t, dict):
        if out.get("teacher") is None:
            out["teacher"] = prev_t
        else:
            out["teacher"] = {**out["teacher"], **{k: prev_t[k] for k in ("model", "quantization")
                                                   if not out["teacher"].get(k) and isinstance(prev_t.get(k), str)}}
    return out
