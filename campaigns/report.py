"""The campaign's HTML report: one self-contained page (tables, and plots as embedded PNG).

Sections: the verdict per requirement (with the ids of the runs that break it), runs and
errors, hazard rate per scenario (bar chart and table), the distribution of the therapy's
headline metric per scenario (time in range, the RMS tracking error, ...), the supervisor's
detection scores, and the traces of the worst runs (drawn by the therapy's campaigns part).
``OUT/report.html`` opens in any browser without a server or network.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from twinloop.campaigns.spec import CampaignSpec
from twinloop.therapy import get_therapy

__all__ = ["write_report"]


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return (
        '<img alt="plot" src="data:image/png;base64,'
        + base64.b64encode(buf.getvalue()).decode()
        + '">'
    )


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{c if isinstance(c, str) and c.startswith('<') else _fmt(c)}</td>" for c in row
        )
        + "</tr>"
        for row in rows
    )
    # a table wider than the page scrolls inside its own box; the page never does
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _hazard_plot(summary: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scen = list(summary["per_scenario"])
    labels = summary["labels"]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(scen) + 2), 3.6))
    width = 0.8 / len(labels)
    x = np.arange(len(scen))
    for i, label in enumerate(labels):
        rates = [summary["per_scenario"][s]["hazard_rate"][label] or 0.0 for s in scen]
        ax.bar(x + i * width, rates, width, label=label)
    ax.set_xticks(x + 0.4 - width / 2, scen, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("fraction of runs with the hazard")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=len(labels))
    ax.set_title("Hazard rate by scenario (fault type)")
    return _png(fig)


def _distribution_plot(spec: CampaignSpec, results: list[dict[str, Any]], part: Any) -> str:
    import matplotlib.pyplot as plt

    field = part.headline.metric
    scen = [s.name for s in spec.scenarios]
    data = [
        [r["metrics"][field] for r in results if r.get("status") == "ok" and r["scenario"] == s]
        for s in scen
    ]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(scen) + 2), 3.6))
    ax.boxplot([d if d else [np.nan] for d in data], showfliers=True)
    ax.set_xticks(np.arange(1, len(scen) + 1), scen, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(part.headline.axis_label)
    ax.set_title("Distribution per scenario")
    return _png(fig)


def _trace_plot(out: Path, spec: CampaignSpec, run_id: str, part: Any) -> str:
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    path = out / "traces" / f"{run_id}.parquet"
    if not path.exists():
        return "<p>(no trace)</p>"
    t = pq.read_table(path).to_pydict()
    scenario = spec.scenario(run_id.split(".")[0]) if "." in run_id else None
    fig, ax = plt.subplots(figsize=(9, 3.2))
    scale = part.plot_trace(ax, t)
    if scenario is not None:
        for f in scenario.faults:
            end = f.end if np.isfinite(f.end) else f.start + 1e9
            ax.axvspan(f.start / scale, min(end, 1e9) / scale, color="orange", alpha=0.15)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(run_id + " (fault windows shaded)")
    return _png(fig)


def write_report(
    out: Path, spec: CampaignSpec, summary: dict[str, Any], results: list[dict[str, Any]]
) -> Path:
    """Write ``out/report.html``; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    part = get_therapy(spec.therapy).part("campaigns")
    runs = summary["runs"]
    req_rows = [
        [
            r["id"],
            r["text"],
            f"<b>{r['verdict']}</b>",
            r["runs_judged"],
            r["runs_failing"],
            r["runs_errored"],
            html.escape(
                ", ".join(r["failing_ids"][:12]) + (" …" if len(r["failing_ids"]) > 12 else "")
            ),
        ]
        for r in summary["requirements"]
    ]
    unit = part.label_unit
    scen_rows = []
    for name, e in summary["per_scenario"].items():
        row = [name, ", ".join(e["faults"]) or "none", e["runs"]]
        row += [e["hazard_rate"][label] for label in summary["labels"]]
        row += [e["mean_hazard_" + unit][label] for label in summary["labels"]]
        row += [e["median_onset_to_hazard"][label] for label in summary["labels"]]
        row.append(e.get(part.headline.summary_key))
        scen_rows.append(row)
    scen_headers = ["scenario", "faults", "runs"]
    scen_headers += [f"rate {label}" for label in summary["labels"]]
    scen_headers += [f"mean {unit} {label}" for label in summary["labels"]]
    scen_headers += [f"median onset→{label}" for label in summary["labels"]]
    scen_headers.append(part.headline.column)
    d = summary["detection"]
    errors = [r for r in results if r.get("status") != "ok"]
    error_html = (
        ""
        if not errors
        else _table(["run", "error"], [[e["id"], e["error"]] for e in summary["errored_runs"]])
        + "".join(
            f"<details><summary>{html.escape(r['id'])}</summary>"
            f"<pre>{html.escape(r.get('traceback') or r.get('error') or '')}</pre></details>"
            for r in errors[:20]
        )
    )
    reasons = "".join(f"<li>{html.escape(why)}</li>" for why in summary["verdict_reasons"])
    traces = "".join(_trace_plot(out, spec, rid, part) for rid in summary["worst_runs"])
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>twinloop campaign {html.escape(spec.name)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
*, *::before, *::after {{ box-sizing: border-box; }}
body {{ font-family: sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1200px;
  line-height: 1.4; overflow-wrap: anywhere; }}
.scroll {{ max-width: 100%; overflow-x: auto; margin: 1em 0; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 7px; text-align: right; overflow-wrap: normal; }}
td:first-child, th:first-child {{ text-align: left; }}
img {{ display: block; max-width: 100%; height: auto; }}
h1 .fail {{ color: #b00; }} h1 .pass {{ color: #070; }}
pre {{ font-size: 11px; background: #f6f6f6; padding: 0.5em; white-space: pre-wrap; }}
</style></head><body>
<h1>Campaign {html.escape(spec.name)} — <span class="{summary["verdict"]}">{
        summary["verdict"].upper()
    }</span></h1>
<p>Therapy {html.escape(spec.therapy)}, controller {html.escape(spec.controller)},
{len(spec.patients)} patients × {len(spec.scenarios)} scenarios × {len(spec.seeds)} seeds =
{runs["total"]} runs; {runs["ok"]} ok, {runs["errors"]} errored (allowed:
{runs["errors_allowed"]}). Spec fingerprint
{summary["fingerprint"]}. Replay any run: <code>twinloop campaign {
        html.escape(spec.source)
    } --rerun ID</code>.</p>
<ul>{reasons}</ul>
<h2>Requirements</h2>
{
        _table(
            [
                "id",
                "requirement",
                "verdict",
                "runs judged",
                "runs failing",
                "of which errored",
                "failing run ids",
            ],
            req_rows,
        )
    }
<h2>Hazards by scenario</h2>
{_hazard_plot(summary)}
{_table(scen_headers, scen_rows)}
<h2>Distribution</h2>
{_distribution_plot(spec, results, part)}
<h2>Supervisor detections</h2>
<p>{html.escape(d["definition"])}</p>
{
        _table(
            ["detections", "true detections", "precision", "hazard episodes", "detected", "recall"],
            [
                [
                    d["detections"],
                    d["true_detections"],
                    d["precision"],
                    d["episodes"],
                    d["detected_episodes"],
                    d["recall"],
                ]
            ],
        )
    }
<h2>Worst runs</h2>
{traces}
<h2>Errored runs ({runs["errors"]}; each fails every requirement beyond errors_allowed
{runs["errors_allowed"]})</h2>
{error_html or "<p>none</p>"}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
