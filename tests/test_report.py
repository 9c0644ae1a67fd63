import base64
import re

import numpy as np
import pytest

from idcscope.evaluation import plots
from idcscope.evaluation.metrics import (
    binary_metrics,
    classification_report_text,
    per_patient_metrics,
)
from idcscope.evaluation.report import write_html_report

LEAK = "Image-level random split: patients leak between train and test; numbers are <optimistic>."


@pytest.fixture
def evaluation(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.4 * y + 0.6 * rng.random(200), 0, 1)
    patients = np.repeat(["p<1>", "p2", "p3", "p4"], 50)
    metrics = binary_metrics(y, p)
    metrics["n_patients"] = 4
    metrics["per_patient"] = per_patient_metrics(y, p, patients)
    plots.save_figure(plots.plot_roc(y, p), tmp_path / "roc.png", dpi=50)
    absolute = plots.save_figure(plots.plot_pr(y, p), tmp_path / "elsewhere" / "pr.png", dpi=50)
    figures = {"ROC curve": "roc.png", "PR & curve": absolute}
    sections = {"Classification report": classification_report_text(y, p >= 0.5)}
    return tmp_path / "out", metrics, figures, sections


def _write(evaluation, tmp_path, **kwargs):
    out_dir, metrics, figures, sections = evaluation
    # Relative figure paths resolve against out_dir, so put the ROC there.
    out_dir.mkdir(exist_ok=True)
    (out_dir / "roc.png").write_bytes((tmp_path / "roc.png").read_bytes())
    path = write_html_report(out_dir, "Test <fold 1>", metrics, figures, sections, **kwargs)
    return path, path.read_text(encoding="utf-8"), metrics


def test_report_written_with_metrics(evaluation, tmp_path):
    path, html, metrics = _write(evaluation, tmp_path, warnings=[LEAK])
    assert path == tmp_path / "out" / "report.html"
    assert html.startswith("<!DOCTYPE html>")
    assert f"{metrics['auc']:.3f}" in html
    assert f"{metrics['balanced_accuracy']:.3f}" in html
    assert f"{metrics['majority_baseline_accuracy']:.3f}" in html
    assert "<td>Patients</td><td>4</td>" in html
    tn, fp = metrics["confusion_matrix"][0]
    assert f"<td>no IDC</td><td>{tn}</td><td>{fp}</td>" in html
    assert "Research use only — not a medical device." in html


def test_report_escapes_text_and_shows_warning_first(evaluation, tmp_path):
    _, html, _ = _write(evaluation, tmp_path, warnings=[LEAK])
    assert "numbers are &lt;optimistic&gt;." in html
    assert "<optimistic>" not in html
    assert "<title>Test &lt;fold 1&gt;</title>" in html
    assert "<td>p&lt;1&gt;</td>" in html  # per-patient table, escaped
    assert "PR &amp; curve" in html
    body = html[html.index("<body>") :]
    assert body.index('class="warnings"') < body.index("<h2>Summary</h2>")


def test_report_without_warnings_has_no_box(evaluation, tmp_path):
    _, html, _ = _write(evaluation, tmp_path)
    assert 'class="warnings"' not in html


def test_report_embeds_images_and_is_self_contained(evaluation, tmp_path):
    _, html, _ = _write(evaluation, tmp_path)
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == 2
    assert base64.b64decode(uris[0]) == (tmp_path / "roc.png").read_bytes()
    assert "http://" not in html
    assert "https://" not in html
    assert "<link" not in html
    assert "<script" not in html


def test_report_sections_and_per_patient(evaluation, tmp_path):
    _, html, _ = _write(evaluation, tmp_path)
    assert "<h2>Classification report</h2>" in html
    assert re.search(r"<pre>\s+precision\s+recall", html)
    assert "Per patient (4)" in html
    assert html.count("<td>p2</td>") == 1


def test_report_missing_figure_becomes_warning(tmp_path):
    metrics = binary_metrics([0, 1, 1], [0.2, 0.7, 0.4])
    html = write_html_report(tmp_path, "t", metrics, {"ROC": "nope.png"}).read_text(
        encoding="utf-8"
    )
    assert 'class="warnings"' in html
    assert "Figure &#x27;ROC&#x27; is missing" in html
    assert "<img" not in html
    assert "Per patient" not in html


def test_report_undefined_metrics_render_as_dash(tmp_path):
    metrics = binary_metrics([0, 0], [0.2, 0.7])
    html = write_html_report(tmp_path, "t", metrics, {}).read_text(encoding="utf-8")
    assert "<td>ROC AUC</td><td>—</td>" in html
    assert "None" not in html
    assert "nan" not in html.lower()
