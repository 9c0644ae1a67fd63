"""Training, evaluation and prediction end to end on tiny synthetic patients."""

import csv
import json

import numpy as np
import pytest
import torch
import yaml

from idcscope.errors import CheckpointError, IdcscopeError
from idcscope.evaluation.evaluate import evaluate
from idcscope.inference.predict import predict
from idcscope.models.checkpoint import load_model, read_checkpoint
from idcscope.training.config import make_config
from idcscope.training.train import train


def _cfg(data, out, **kw):
    base = {"epochs": 2, "batch_size": 32, "threads": 2, "val_fraction": 0.2, "test_fraction": 0.2}
    return make_config("default", data=str(data), out=str(out), **{**base, **kw})


@pytest.fixture(scope="module")
def run_dir(trained_run):
    return trained_run


def test_run_folder_is_complete(run_dir):
    for name in ("best.pt", "last.pt", "config.yaml", "splits.json", "history.csv", "skipped.csv"):
        assert (run_dir / name).is_file(), name
    with (run_dir / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert float(rows[0]["images_per_s"]) > 0
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["model"] == "cancernet" and cfg["epochs"] == 4


def test_checkpoint_describes_itself_and_loads_without_pickle(run_dir):
    raw = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    for key in (
        "state_dict",
        "model",
        "config",
        "class_names",
        "preprocessing",
        "threshold",
        "splits",
        "validation",
    ):
        assert key in raw, key
    assert raw["class_names"] == ["no_idc", "idc"]
    assert set(raw["preprocessing"]) >= {"mean", "std", "patch_size", "mpp"}
    assert 0.0 <= raw["threshold"] <= 1.0
    model, _ = load_model(run_dir / "best.pt")
    assert not model.training
    channels = len(raw["preprocessing"]["mean"])  # 3, or 6 with the neighbourhood view
    assert channels == 3 * (1 + (raw["config"]["neighbourhood"] > 0))
    assert model(torch.zeros(1, channels, 50, 50)).shape == (1, 2)
    assert "optimizer" in read_checkpoint(run_dir / "last.pt")


def test_keep_last_makes_the_final_epoch_the_model(synthetic_root, tmp_path):
    import pandas as pd

    train(_cfg(synthetic_root, tmp_path, epochs=3, keep="last"))
    assert read_checkpoint(tmp_path / "best.pt")["epoch"] == 3
    torch.testing.assert_close(
        read_checkpoint(tmp_path / "best.pt")["state_dict"],
        read_checkpoint(tmp_path / "last.pt")["state_dict"],
    )
    assert len(pd.read_csv(tmp_path / "history.csv")) == 3


def test_default_recipe_fits_the_spatial_context_on_validation(run_dir):
    from idcscope.training.calibration import SIGMAS

    ctx = read_checkpoint(run_dir / "best.pt")["context"]
    losses = {float(k): v for k, v in ctx["val_log_loss"].items()}
    assert set(losses) == set(SIGMAS) and ctx["step"] == 50
    assert ctx["sigma"] in SIGMAS and losses[ctx["sigma"]] == min(losses.values())


def test_split_has_no_patient_on_two_sides(run_dir):
    s = json.loads((run_dir / "splits.json").read_text())
    assert s["test"] and s["val"] and s["train"]
    assert not (set(s["train"]) & set(s["test"]) or set(s["val"]) & set(s["test"]))


def test_evaluate_writes_metrics_plots_and_report(run_dir, synthetic_root, tmp_path):
    m = evaluate(run_dir / "best.pt", synthetic_root, tmp_path, split="test", n_boot=50)
    for key in (
        "auc",
        "pr_auc",
        "accuracy",
        "balanced_accuracy",
        "f1",
        "precision",
        "recall",
        "specificity",
        "threshold",
        "confusion_matrix",
        "n",
        "n_patients",
        "majority_baseline_accuracy",
        "per_patient",
    ):
        assert key in m, key
    ckpt = read_checkpoint(run_dir / "best.pt")
    assert m["threshold"] == pytest.approx(ckpt["threshold"])  # from validation, not test
    assert m["n_patients"] == len(ckpt["splits"]["test"])
    assert sum(map(sum, m["confusion_matrix"])) == m["n"]
    for name in (
        "metrics.json",
        "classification_report.txt",
        "roc.png",
        "pr.png",
        "confusion_matrix.png",
        "training_curves.png",
        "report.html",
        "predictions.csv",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "metrics.json").read_text())["n"] == m["n"]


def test_evaluating_training_patients_warns(run_dir, synthetic_root, tmp_path):
    m = evaluate(run_dir / "best.pt", synthetic_root, tmp_path, n_boot=0)
    assert any("used to train or validate" in w for w in m["warnings"])
    assert "used to train or validate" in (tmp_path / "report.html").read_text()


def test_predict_files_and_folders(run_dir, synthetic_root, tmp_path):
    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    df = predict(run_dir / "best.pt", [patient, broken], tmp_path / "preds.csv")
    n_files = len(list(patient.rglob("*.png")))
    assert len(df) == n_files + 1  # every input accounted for
    assert list(df.columns)[:7] == ["path", "patient", "x", "y", "neighbours", "prob_idc", "pred"]
    good = df[df["error"] == ""]
    assert len(good) == n_files and good["prob_idc"].between(0, 1).all()
    assert (good["patient"] == patient.name).all() and (good["x"] >= 0).all()
    assert df.loc[df["path"].str.endswith("broken.png"), "error"].str.len().iloc[0] > 0


def test_killed_run_resumes_to_the_same_weights(synthetic_root, tmp_path, monkeypatch):
    import idcscope.training.train as T

    train(_cfg(synthetic_root, tmp_path / "full", epochs=2))
    real, calls = T.train_one_epoch, []

    def dies_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed half-way: only epoch 1 is on disk
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "train_one_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(synthetic_root, tmp_path / "cut", epochs=2))
    monkeypatch.setattr(T, "train_one_epoch", real)
    train(_cfg(synthetic_root, tmp_path / "cut", epochs=2), resume=True)
    with (tmp_path / "cut" / "history.csv").open() as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]
    full = read_checkpoint(tmp_path / "full" / "last.pt")["state_dict"]
    cut = read_checkpoint(tmp_path / "cut" / "last.pt")["state_dict"]
    assert all(torch.allclose(full[k].float(), cut[k].float(), atol=1e-6) for k in full)


def test_same_seed_same_weights(synthetic_root, tmp_path):
    a = train(_cfg(synthetic_root, tmp_path / "a", epochs=1))
    b = train(_cfg(synthetic_root, tmp_path / "b", epochs=1))
    wa = read_checkpoint(tmp_path / "a" / "last.pt")["state_dict"]
    wb = read_checkpoint(tmp_path / "b" / "last.pt")["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["val_metrics"]["auc"] == b["val_metrics"]["auc"]


def test_report_recipe_values():
    cfg = make_config("report")
    assert (cfg.optimizer, cfg.schedule, cfg.epochs, cfg.batch_size, cfg.augment) == (
        "adam",
        "keras_decay",
        20,
        32,
        "report",
    )


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(IdcscopeError, match="unknown recipe"):
        make_config("fancy")
    with pytest.raises(IdcscopeError, match="augment"):
        make_config("default", augment="sparkles")
    with pytest.raises(IdcscopeError, match=r"drop_neighbours=1\.5; a share from 0 to 1"):
        make_config("default", drop_neighbours=1.5)
    bad = tmp_path / "c.yaml"
    bad.write_text("epochz: 3\n")
    with pytest.raises(IdcscopeError, match="epochz"):
        make_config("default", yaml_path=bad)


def test_non_checkpoint_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": "idcscope-checkpoint/1", "x": Evil()}))
    with pytest.raises(CheckpointError, match=r"evil\.pt"):
        read_checkpoint(path)


def test_one_class_training_data_is_refused(tmp_path):
    from tests.conftest import write_patch

    for p in ("1", "2", "3", "4", "5"):
        for k in range(4):
            write_patch(
                tmp_path / "d" / p / "0" / f"{p}_idx5_x{k}_y0_class0.png",
                color=(np.uint8(40 * k), 50, 60),
            )
    with pytest.raises(IdcscopeError, match="only one class"):
        train(_cfg(tmp_path / "d", tmp_path / "run"))


def test_calibration_and_threshold_come_from_validation(run_dir):
    ckpt = read_checkpoint(run_dir / "best.pt")
    assert 0.05 <= ckpt["temperature"] <= 20
    cal = ckpt["calibration"]
    # temperature scaling minimises the validation NLL, so it cannot make it worse
    assert cal["nll_after"] <= cal["nll_before"] + 1e-6
    y, p = ckpt["validation"]["labels"].numpy(), ckpt["validation"]["prob"].numpy()
    from idcscope.evaluation.metrics import youden_threshold

    assert ckpt["threshold"] == pytest.approx(youden_threshold(y, p))


def test_target_sensitivity_threshold(synthetic_root, tmp_path):
    summary = train(
        _cfg(synthetic_root, tmp_path, epochs=1, threshold="sensitivity", target_sensitivity=0.95)
    )
    assert summary["val_metrics"]["recall"] >= 0.95
    assert summary["threshold_method"].startswith("sensitivity 0.95")


def test_stain_normalised_training_and_inference(synthetic_root, tmp_path):
    train(_cfg(synthetic_root, tmp_path / "run", epochs=1, stain="reinhard"))
    ckpt = read_checkpoint(tmp_path / "run" / "best.pt")
    prep = ckpt["preprocessing"]
    assert prep["stain"] == "reinhard" and prep["stain_reference"]
    m = evaluate(
        tmp_path / "run" / "best.pt", synthetic_root, tmp_path / "eval", split="test", n_boot=0
    )
    assert 0.0 <= m["auc"] <= 1.0


def test_focal_loss_is_weighted_cross_entropy_at_gamma_0_and_discounts_easy_patches():
    import torch
    import torch.nn.functional as F

    from idcscope.training.objective import FocalLoss

    torch.manual_seed(0)
    logits, y = torch.randn(64, 2) * 3, torch.randint(0, 2, (64,))
    w = torch.tensor([0.6, 2.5])
    torch.testing.assert_close(FocalLoss(0.0, w)(logits, y), F.cross_entropy(logits, y, weight=w))
    easy = torch.tensor([[6.0, -6.0]])  # confidently right
    hard = torch.tensor([[-1.0, 1.0]])  # wrong
    target = torch.tensor([0])
    ratio_easy = FocalLoss(2.0)(easy, target) / F.cross_entropy(easy, target)
    ratio_hard = FocalLoss(2.0)(hard, target) / F.cross_entropy(hard, target)
    assert ratio_easy < 1e-6 < 0.5 < ratio_hard < 1


def test_balanced_sampler_draws_both_classes_equally_and_the_loss_is_unweighted():
    from idcscope.training.loop import PatchLoader
    from idcscope.training.objective import make_loss

    labels = (np.arange(1000) % 10 == 0).astype(np.int64)  # 10% positive
    images = np.arange(1000)[:, None]
    rows = np.arange(1000)[::2]  # the rows in use: 5% of the dataset, 100 positives
    loader = PatchLoader(images, labels, rows, 50, shuffle=True, balanced=True, seed=3)
    drawn = np.concatenate([np.sort(x[:, 0]) for x, _ in loader])
    assert len(drawn) == len(rows) and set(drawn) <= set(rows)
    assert 0.45 < labels[drawn].mean() < 0.55
    assert len(set(drawn[labels[drawn] == 1])) > 80  # the positives, drawn with replacement

    def draw(epoch):
        loader.epoch = epoch
        return np.concatenate([np.sort(x[:, 0]) for x, _ in loader])

    assert np.array_equal(draw(0), drawn) and not np.array_equal(draw(1), drawn)
    cfg = make_config("default", imbalance="balanced_sampler")
    assert make_loss(cfg, labels[rows]).weight is None  # sampling balances; no double count


def test_border_weight_draws_the_patches_at_annotation_borders_less_often():
    from idcscope.data.grid import label_borders
    from idcscope.training.loop import PatchLoader

    # One patient, a 10x10 grid: IDC in the left 4 columns; a lone patch without a place.
    r, c = np.divmod(np.arange(100), 10)
    xs, ys = np.append(c * 50, -1), np.append(r * 50, -1)
    labels = np.append((c < 4).astype(np.int64), 1)
    border = label_borders(np.zeros(101), xs, ys, labels)
    assert border[:100].sum() == 20 and set(np.flatnonzero(border[:100]) % 10) == {3, 4}
    assert not border[100]
    rows = np.arange(101)
    weights = np.where(border, 0.25, 1.0)
    loader = PatchLoader(
        rows[:, None], labels, rows, 101, shuffle=True, balanced=True, seed=0, weights=weights
    )
    drawn = []
    for epoch in range(200):
        loader.epoch = epoch
        drawn += [x[:, 0] for x, _ in loader]
    drawn = np.concatenate(drawn)
    assert 0.47 < labels[drawn].mean() < 0.53  # still balanced
    per_row = np.bincount(drawn, minlength=101)
    for cls in (0, 1):  # within a class, a border patch a quarter as often as the others
        mine = (labels == cls) & (rows < 100)
        ratio = per_row[mine & border].mean() / per_row[mine & ~border].mean()
        assert ratio == pytest.approx(0.25, rel=0.1)
    with pytest.raises(IdcscopeError, match="border_weight"):
        make_config("default", border_weight=0.0)


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    from idcscope.models import runtime as engine

    assert make_config("default").precision == "auto"
    for caps, expected in [
        ({"avx2": True}, "fp32"),  # bf16 would be emulated: ten times slower than fp32
        ({"avx512_bf16": True}, "bf16"),
        ({"amx_bf16": True}, "bf16"),
    ]:
        engine._native_bf16.cache_clear()
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda c=caps: c)
        assert engine.resolve_precision("auto", "cpu") == expected
        assert engine.resolve_precision("fp32", "cpu") == "fp32"
        assert engine.resolve_precision("bf16", "cpu") == "bf16"
        autocasting = isinstance(engine.autocast("auto"), torch.autocast)
        assert autocasting == (expected == "bf16")
    engine._native_bf16.cache_clear()


def test_a_run_log_leaves_the_root_logger_as_it_was(tmp_path):
    import logging

    from idcscope.cli.app import log_to_file

    root, log = logging.getLogger(), logging.getLogger("idcscope.test")
    before = list(root.handlers)
    with log_to_file(tmp_path / "run"):
        log.warning("inside the run")
    log.warning("after the run")
    assert root.handlers == before
    text = (tmp_path / "run" / "train.log").read_text()
    assert "inside the run" in text and "after the run" not in text


def test_consistency_is_the_jensen_shannon_divergence_of_the_views():
    import torch.nn.functional as F

    from idcscope.training.objective import js_consistency

    same = torch.randn(8, 2).repeat(2, 1)
    assert js_consistency(same).item() == pytest.approx(0.0, abs=1e-7)
    a, b = torch.tensor([[0.0, 0.0]]), torch.tensor([[30.0, -30.0]])  # (1/2, 1/2) and (1, 0)
    m = torch.tensor([0.75, 0.25])
    expected = 0.5 * (F.kl_div(m.log(), torch.tensor([0.5, 0.5]), reduction="sum") + (-m[0].log()))
    assert js_consistency(torch.cat([a, b])).item() == pytest.approx(expected.item(), rel=1e-5)


def test_consistency_steps_learn_as_plain_ones_when_the_views_agree():
    """Two identical views: the doubled batch has the same loss, gradients and batch-norm
    statistics, so the weights end where plain steps take them. On the same two random
    views, the term's weight moves them."""
    from idcscope.training.loop import PatchLoader, train_one_epoch

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (96, 3, 8, 8), dtype=np.uint8)
    labels = (images.mean((1, 2, 3)) > 127).astype(np.int64)
    loader = PatchLoader(images, labels, np.arange(96), 32, shuffle=True, seed=0)

    def weights_after(consistency, augment):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2),
        )  # fmt: skip
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        train_one_epoch(
            net, loader, opt, None, torch.nn.CrossEntropyLoss(), lambda x: x, augment,
            torch.Generator().manual_seed(0), "fp32", consistency=consistency,
        )  # fmt: skip
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    def noisy(x, g):
        return x + 0.3 * torch.randn(x.shape, generator=g)

    plain = weights_after(0.0, lambda x, g: x)
    torch.testing.assert_close(weights_after(5.0, lambda x, g: x), plain, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(weights_after(5.0, noisy), weights_after(1e-9, noisy), atol=1e-3)
