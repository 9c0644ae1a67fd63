import subprocess
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure

from idcscope.evaluation import plots
from idcscope.evaluation.metrics import per_patient_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.4 * y + 0.6 * rng.random(300), 0, 1)
    patients = np.repeat([f"p{i}" for i in range(10)], 30)
    return y, p, patients


def _legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _assert_png(path):
    assert path.is_file()
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000


def _cases(y, p, patients):
    history = [
        {
            "epoch": str(e),
            "train_loss": str(1 / e),
            "val_loss": str(1.2 / e),
            "val_auc": str(0.7 + e / 50),
        }
        for e in range(1, 6)
    ]
    return {
        "roc": lambda ax: plots.plot_roc(y, p, ax=ax, label="resnet", threshold=0.5),
        "pr": lambda ax: plots.plot_pr(y, p, ax=ax, label="resnet", threshold=0.5),
        "cm": lambda ax: plots.plot_confusion_matrix([[120, 30], [20, 130]], ax=ax),
        "history": lambda ax: plots.plot_history(history, ax=ax),
        "reliability": lambda ax: plots.plot_reliability(y, p, ax=ax),
        "per_patient": lambda ax: plots.plot_per_patient(
            per_patient_metrics(y, p, patients), ax=ax
        ),
    }


@pytest.mark.parametrize("name", ["roc", "pr", "cm", "history", "reliability", "per_patient"])
def test_plot_creates_figure_and_saves_png(name, scores, tmp_path):
    fig = _cases(*scores)[name](None)
    assert isinstance(fig, Figure)
    assert fig.axes
    out = plots.save_figure(fig, tmp_path / "sub" / f"{name}.png", dpi=80)
    assert out == tmp_path / "sub" / f"{name}.png"
    _assert_png(out)


@pytest.mark.parametrize("name", ["roc", "pr", "cm", "history", "reliability", "per_patient"])
def test_plot_draws_into_given_ax(name, scores, tmp_path):
    fig = Figure(figsize=(12, 4))
    ax = fig.add_subplot(1, 3, 2)
    assert _cases(*scores)[name](ax) is fig
    assert ax.has_data()
    _assert_png(plots.save_figure(fig, tmp_path / f"{name}.png", dpi=60))


def test_plot_into_subfigure_returns_root_figure(scores):
    y, p, _ = scores
    fig = Figure()
    ax = fig.subfigures(1, 2)[1].add_subplot()
    assert plots.plot_roc(y, p, ax=ax) is fig


def test_roc_legend_and_labels(scores):
    y, p, _ = scores
    from sklearn.metrics import roc_auc_score

    ax = plots.plot_roc(y, p, label="resnet18", threshold=0.5).axes[0]
    texts = _legend_texts(ax)
    assert f"resnet18 (AUC = {roc_auc_score(y, p):.3f})" in texts
    assert "Chance" in texts
    assert "Threshold 0.50" in texts
    assert ax.get_xlabel()
    assert ax.get_ylabel()
    assert ax.get_title()


def test_roc_operating_point_location():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.2, 0.6, 0.4, 0.9])
    ax = plots.plot_roc(y, p, threshold=0.5).axes[0]
    point = next(line for line in ax.lines if line.get_label() == "Threshold 0.50")
    assert point.get_xdata()[0] == pytest.approx(0.5)  # fpr
    assert point.get_ydata()[0] == pytest.approx(0.5)  # tpr


def test_pr_legend_shows_ap_and_prevalence(scores):
    y, p, _ = scores
    from sklearn.metrics import average_precision_score

    texts = _legend_texts(plots.plot_pr(y, p).axes[0])
    assert f"AP = {average_precision_score(y, p):.3f}" in texts
    assert f"Prevalence = {y.mean():.3f}" in texts


def test_curves_with_one_class_do_not_crash(tmp_path):
    for fn in (plots.plot_roc, plots.plot_pr):
        fig = fn([0, 0, 0], [0.1, 0.5, 0.9], threshold=0.5)
        _assert_png(plots.save_figure(fig, tmp_path / f"{fn.__name__}.png", dpi=50))


def test_confusion_matrix_cell_text():
    ax = plots.plot_confusion_matrix([[90, 10], [0, 0]], class_names=("a", "b")).axes[0]
    texts = {t.get_text() for t in ax.texts}
    assert "90\n(90.0%)" in texts
    assert "0\n(0.0%)" in texts  # empty row: no division by zero
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]


def test_history_from_csv_strings():
    history = [
        {"epoch": "1", "train_loss": "0.9", "val_loss": "1.0", "val_auc": "0.80"},
        {"epoch": "2", "train_loss": "0.5", "val_loss": "0.7", "val_auc": "0.85"},
        {"epoch": "3", "train_loss": "0.3", "val_loss": "", "val_auc": "0.83"},
    ]
    fig = plots.plot_history(history)
    assert len(fig.axes) == 2
    loss_ax, auc_ax = fig.axes
    assert len(loss_ax.lines) == 2
    assert np.allclose(loss_ax.lines[0].get_ydata(), [0.9, 0.5, 0.3])
    assert np.allclose(auc_ax.lines[0].get_ydata(), [0.80, 0.85, 0.83])
    assert "Highest, epoch 2" in _legend_texts(auc_ax)


def test_history_without_auc():
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e} for e in (1, 2)]
    assert len(plots.plot_history(history).axes) == 1
    fig = Figure()
    ax = fig.add_subplot()
    plots.plot_history(history, ax=ax)
    assert len(fig.axes) == 1  # no twin axis without AUC


def test_history_twin_axis_when_ax_given():
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e, "val_auc": 0.8} for e in (1, 2)]
    fig = Figure()
    plots.plot_history(history, ax=fig.add_subplot())
    assert len(fig.axes) == 2


def test_reliability_title_has_ece(scores):
    y, p, _ = scores
    from idcscope.evaluation.metrics import expected_calibration_error

    ax = plots.plot_reliability(y, p, n_bins=10).axes[0]
    assert f"{expected_calibration_error(y, p, n_bins=10):.3f}" in ax.get_title()


def test_per_patient_skips_none_and_sorts():
    rows = [
        {"patient": "a", "auc": 0.9},
        {"patient": "b", "auc": None},
        {"patient": "c", "auc": 0.6},
    ]
    ax = plots.plot_per_patient(rows).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["c", "a"]
    assert [bar.get_width() for bar in ax.patches] == pytest.approx([0.6, 0.9])
    assert "1 single-class" in ax.get_title()
    plots.plot_per_patient([{"patient": "b", "auc": None}])  # nothing to draw, no crash


def test_pyplot_is_never_imported():
    # pyplot would pick a GUI backend and keep global figure state; check in a fresh process.
    code = "import sys, idcscope.evaluation.plots; assert 'matplotlib.pyplot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.filterwarnings("error")
def test_history_empty_or_nan_does_not_warn():
    plots.plot_history([])
    plots.plot_history([{"epoch": "1", "train_loss": "", "val_loss": "", "val_auc": ""}])
