"""A single self-contained HTML evaluation report.

Figures are embedded as base64 data URIs and the CSS is inline, so ``report.html`` can be
mailed or archived alone and opens offline, with no external requests.
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

from idcscope import __version__

logger = logging.getLogger(__name__)

HEADLINE = (
    ("auc", "ROC AUC"),
    ("pr_auc", "PR AUC (average precision)"),
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("f1", "F1"),
    ("precision", "Precision (PPV)"),
    ("recall", "Recall (sensitivity)"),
    ("specificity", "Specificity"),
    ("threshold", "Decision threshold"),
    ("n", "Patches"),
    ("n_patients", "Patients"),
    ("majority_baseline_accuracy", "Majority-class baseline accuracy"),
)
PER_PATIENT_COLUMNS = (
    "patient",
    "n",
    "n_positive",
    "auc",
    "sensitivity",
    "specificity",
    "accuracy",
    "mean_prob_negative",
    "mean_prob_positive",
)
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif"}

_CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1000px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-variant-numeric: tabular-nums; }
th, td { padding: 0.25em 0.8em; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { border-bottom: 2px solid #ccc; }
.warnings { background: #fff4e5; border-left: 5px solid #e67700; padding: 0.6em 1em;
            margin: 1em 0; }
.warnings ul { margin: 0.3em 0; padding-left: 1.2em; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figure img { max-width: 460px; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
footer { margin-top: 3em; color: #777; font-size: 0.85em; border-top: 1px solid #ddd;
         padding-top: 0.5em; }
"""


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return escape(str(value))
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>"


def _confusion_table(cm: Sequence[Sequence[int]], names: Sequence[str]) -> str:
    header = ["True \\ Predicted", *names]
    return _table(header, [[name, *row] for name, row in zip(names, cm, strict=True)])


def _data_uri(path: Path) -> str:
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def write_html_report(
    out_dir: str | Path,
    title: str,
    metrics: Mapping[str, Any],
    figures: Mapping[str, str | Path],
    sections: Mapping[str, str] | None = None,
    warnings: Sequence[str] | None = None,
) -> Path:
    """Write ``out_dir/report.html``: warnings, headline metrics, figures and text sections.

    Args:
        out_dir: Folder to write into (created if missing).
        title: Page title and heading.
        metrics: Output of :func:`idcscope.evaluation.metrics.binary_metrics`, optionally with
            ``n_patients``, ``class_names`` and ``per_patient`` (a list of per-patient dicts).
        figures: Caption -> image path (PNG), relative to ``out_dir`` or absolute. A missing
            file is reported in the warning box rather than failing the whole report.
        sections: Heading -> preformatted text, such as a classification report.
        warnings: Caveats shown prominently at the top, e.g. about patient leakage.

    Returns:
        Path of the written report.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    warnings = list(warnings or [])

    figure_html = []
    for caption, fig_path in figures.items():
        path = Path(fig_path) if Path(fig_path).is_absolute() else out_dir / fig_path
        if not path.is_file():
            logger.warning("report: figure %r not found at %s", caption, path)
            warnings.append(f"Figure '{caption}' is missing: {path}")
            continue
        figure_html.append(
            f'<figure><img src="{_data_uri(path)}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>"
        )

    parts = [f"<h1>{escape(title)}</h1>"]
    if warnings:
        items = "".join(f"<li>{escape(w)}</li>" for w in warnings)
        parts.append(f'<div class="warnings"><strong>Warning</strong><ul>{items}</ul></div>')
    headline = [(name, metrics[key]) for key, name in HEADLINE if key in metrics]
    if headline:
        parts += ["<h2>Summary</h2>", _table(["Metric", "Value"], headline)]
    if metrics.get("confusion_matrix") is not None:
        names = metrics.get("class_names") or ("no IDC", "IDC")
        parts += ["<h2>Confusion matrix</h2>", _confusion_table(metrics["confusion_matrix"], names)]
    if figure_html:
        parts += ["<h2>Figures</h2>", "\n".join(figure_html)]
    if metrics.get("per_patient"):
        rows = [[r.get(c) for c in PER_PATIENT_COLUMNS] for r in metrics["per_patient"]]
        parts += [f"<h2>Per patient ({len(rows)})</h2>", _table(PER_PATIENT_COLUMNS, rows)]
    for heading, text in (sections or {}).items():
        parts += [f"<h2>{escape(heading)}</h2>", f"<pre>{escape(text)}</pre>"]

    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(
        f"<footer>Research use only — not a medical device. "
        f"Generated by idcscope {escape(__version__)} on {generated}.</footer>"
    )
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body>\n</html>\n"
    )
    report = out_dir / "report.html"
    report.write_text(page, encoding="utf-8")
    logger.info("wrote %s", report)
    return report
