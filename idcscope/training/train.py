"""Train a patch classifier: data, split, loop, checkpoints, history, validation threshold.

A run folder holds ``config.yaml``, ``splits.json``, ``history.csv``, ``skipped.csv``,
``best.pt`` (lowest validation loss, or the last epoch with ``keep="last"``) and ``last.pt``
(resumable). The decision threshold is chosen on the validation patients and stored in both
checkpoints.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..data import splits as splitting
from ..data.augment import create_augment
from ..data.dataset import PatchData, load_patch_data
from ..data.manifest import CLASS_NAMES, roots_text, write_skipped
from ..data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PATCH_MPP,
    Planes,
    Preprocessing,
    channel_stats,
)
from ..distributed import DistContext, process_group
from ..errors import IdcscopeError
from ..evaluation import metrics
from ..inference.calibration import probabilities
from ..models import create_model
from ..models.checkpoint import read_checkpoint, save_checkpoint
from ..models.runtime import resolve_precision
from .config import TrainConfig, save_config
from .loop import PatchLoader, train_one_epoch, validation_pass
from .objective import make_loss, make_optimizer
from .posthoc import finalize

logger = logging.getLogger(__name__)

HISTORY_FIELDS = [
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_auc",
    "val_balanced_accuracy",
    "images_per_s",
    "seconds",
]


def resolve_splits(cfg: TrainConfig, data: PatchData, out: Path) -> dict:
    """Reuse ``out/splits.json`` when present, otherwise make the split and write it."""
    path = out / "splits.json"
    if path.exists() and cfg.split in ("patient", "random"):
        splits = splitting.load_splits(path)
        logger.info("reusing %s", path)
    else:
        splits = splitting.make_splits(
            data.table, cfg.split, cfg.val_fraction, cfg.test_fraction, cfg.seed
        )
        splitting.save_splits(splits, path)
    return splits


def make_preprocessing(cfg: TrainConfig, data: PatchData, train_rows: np.ndarray) -> Preprocessing:
    """Fit the preprocessing on the training patients and make ``data.images`` the model
    input of every patch (``Preprocessing.model_input``, as inference computes it)."""
    reference = None
    if cfg.stain != "none":
        from ..data.stain import fit_reference

        reference = fit_reference(data.images[train_rows], cfg.stain, data.patients[train_rows])
    prep = Preprocessing(
        mpp=PATCH_MPP,
        channels_last=cfg.channels_last,
        stain=cfg.stain,
        stain_reference=reference,
        neighbourhood=cfg.neighbourhood,
    )
    if cfg.stain == "none" and not cfg.neighbourhood:  # nothing to compute: keep the map
        data.images = Planes(data.images)
    else:
        # A file that failed to decode is no neighbour: at inference it is not there at all.
        xs, ys = (np.where(data.ok, data.table[c].to_numpy(), -1) for c in "xy")
        data.images = prep.model_input(data.images, data.patients, (xs, ys))
    if cfg.pretrained or cfg.weights:  # what the pretrained backbone expects
        views = prep.channels // 3
        mean, std = IMAGENET_MEAN * views, IMAGENET_STD * views
    else:
        mean, std = channel_stats(data.images, train_rows, seed=cfg.seed)
    return dataclasses.replace(prep, mean=mean, std=std)


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run the training ``cfg`` describes; returns the summary also stored in ``best.pt``.

    Under torchrun every process trains its share of each batch (DistributedDataParallel);
    rank 0 alone validates, logs and writes the run folder.
    """
    with process_group(cfg.device) as ctx:
        return _train(cfg, resume, ctx)


@dataclasses.dataclass
class _Run:
    """What a training run works with, built once: the model (and its DDP wrapper), the
    batches, the optimiser and schedule, the loss, augmentation and the checkpoint fields."""

    model: nn.Module
    net: nn.Module
    loader: PatchLoader
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: nn.Module
    augment: object
    generator: torch.Generator
    prep: Preprocessing
    meta: dict


def _train(cfg: TrainConfig, resume: bool, ctx: DistContext) -> dict:
    out = Path(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    data, splits = _load_data(cfg, ctx, out)
    train_rows, val_rows = _split_rows(cfg, data, splits, out)
    run = _make_run(cfg, ctx, data, train_rows, splits)
    history: list[dict] = []
    start_epoch, best_loss = 0, math.inf
    if resume and (out / "last.pt").exists():
        start_epoch, best_loss, history = _restore(out / "last.pt", run, ctx)
        logger.info("resuming %s at epoch %d", out, start_epoch + 1)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        stats = _train_epoch(run, cfg, ctx, out, epoch)
        if ctx.is_main:
            val_loss = _validate(run, cfg, ctx, out, data, val_rows, epoch, stats, history, t0)
            improved = val_loss < best_loss or (math.isnan(val_loss) and epoch == cfg.epochs - 1)
            best_loss = val_loss if improved else best_loss
            _save(
                run,
                out,
                epoch,
                val_loss,
                best_loss,
                history,
                keep_best=improved or cfg.keep == "last",
            )
        ctx.barrier()  # nobody starts the next epoch (or resumes) before last.pt exists
    if not ctx.is_main:
        return {}
    return finalize(out, run.model, data, val_rows, run.prep, cfg, history)


def _split_rows(cfg: TrainConfig, data: PatchData, splits: dict, out: Path):
    """The training and validation rows; a clear error when there is nothing to learn."""
    if len(data.rows()) == 0:
        raise IdcscopeError(
            f"{roots_text(cfg.data)}: none of the {data.n_files} files could be read; "
            f"the reasons are in {out / 'skipped.csv'}"
        )
    which = splitting.assign(data.table, splits)
    train_rows, val_rows = data.rows(which == "train"), data.rows(which == "val")
    if len(train_rows) == 0:
        raise IdcscopeError(f"{roots_text(cfg.data)}: no training patches after the split")
    if len(np.unique(data.labels[train_rows])) < 2:
        raise IdcscopeError(f"{roots_text(cfg.data)}: the training patients have only one class")
    return train_rows, val_rows


def _make_run(cfg: TrainConfig, ctx: DistContext, data: PatchData, train_rows, splits) -> _Run:
    model = _build_model(cfg).to(ctx.device)
    net = model
    if ctx.enabled:
        ids = [ctx.local_rank] if ctx.device.startswith("cuda") else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    prep = make_preprocessing(cfg, data, train_rows)
    loader = PatchLoader(
        data.images,
        data.labels,
        train_rows,
        cfg.batch_size,
        shuffle=True,
        balanced=cfg.imbalance == "balanced_sampler",
        seed=cfg.seed,
        drop_last=len(train_rows) > cfg.batch_size,
        rank=ctx.rank,
        world=ctx.world,
        weights=_border_weights(cfg, data, train_rows),
    )
    optimizer, scheduler = make_optimizer(cfg, model, len(loader))
    spread = _stain_spread(cfg, data, train_rows)
    augment = create_augment(cfg.augment, stain=spread)
    if cfg.neighbourhood:
        from ..data.neighbourhood import DropNeighbours

        augment = DropNeighbours(augment, cfg.drop_neighbours, cfg.neighbourhood)
    logger.info("%s precision on %s", resolve_precision(cfg.precision, ctx.device), ctx.device)
    meta = {
        "model": {"name": cfg.model, "kwargs": model_kwargs(cfg)},
        "config": dataclasses.asdict(cfg),
        "class_names": list(CLASS_NAMES),
        "preprocessing": dataclasses.asdict(prep),
        "splits": splits,
        "stain_spread": spread,
        "data_summary": data.summary(),
        "world_size": ctx.world,
    }
    return _Run(
        model, net, loader, optimizer, scheduler,
        make_loss(cfg, data.labels[train_rows]).to(ctx.device), augment,
        # Each process draws its own augmentations; one process draws rank 0's stream.
        torch.Generator().manual_seed(cfg.seed + 7919 * ctx.rank), prep, meta,
    )  # fmt: skip


def _border_weights(cfg: TrainConfig, data: PatchData, train_rows: np.ndarray):
    """``cfg.border_weight`` for the training patches at an annotation border, 1 for the
    others (None: all alike)."""
    if cfg.border_weight == 1.0:
        return None
    from ..data.grid import label_borders

    t = data.table
    border = label_borders(t["patient"], t["x"], t["y"], data.labels)[train_rows]
    logger.info(
        "%d of %d training patches lie at an annotation border: drawn at weight %g",
        border.sum(), len(border), cfg.border_weight,
    )  # fmt: skip
    return np.where(border, cfg.border_weight, 1.0)


def _stain_spread(cfg: TrainConfig, data: PatchData, train_rows: np.ndarray) -> dict | None:
    """The between-patient stain spread that ``cfg.stain_augment`` draws from, fitted on
    the training patches as the model sees them (after any stain normalisation)."""
    if not cfg.stain_augment:
        return None
    from ..data.stain import stain_spread

    patches = np.asarray(data.images[train_rows])[:, :3].transpose(0, 2, 3, 1)
    spread = stain_spread(np.ascontiguousarray(patches), data.patients[train_rows])
    if spread is None:
        logger.warning("stain augmentation: fewer than 2 patients with tissue; none used")
        return None
    for key in ("shift", "log_scale"):
        spread[key] = [cfg.stain_augment * v for v in spread[key]]
    logger.info(
        "stain augmentation from %d patients: shift %s, log scale %s",
        spread["patients"], *(", ".join(f"{v:.3f}" for v in spread[k]) for k in ("shift", "log_scale")),
    )  # fmt: skip
    return spread


def _train_epoch(run: _Run, cfg: TrainConfig, ctx: DistContext, out: Path, epoch: int) -> dict:
    """One epoch of every process; its loss and accuracy over the whole batch."""
    run.loader.epoch = epoch
    try:
        stats = train_one_epoch(
            run.net, run.loader, run.optimizer, run.scheduler, run.loss_fn, run.prep,
            run.augment, run.generator, cfg.precision, ctx.device,
            desc=f"epoch {epoch + 1}/{cfg.epochs}", consistency=cfg.consistency,
        )  # fmt: skip
    except FloatingPointError as e:
        raise _diverged(out, epoch, str(e)) from e
    if not all(torch.isfinite(p).all() for p in run.model.parameters()):
        raise _diverged(out, epoch, "the weights became NaN or infinite")
    # Each process saw its own shard: report the whole batch, as one process would.
    stats["train_loss"], stats["train_acc"] = map(
        ctx.mean, (stats["train_loss"], stats["train_acc"])
    )
    stats["images_per_s"] *= ctx.world
    return stats


def _validate(run: _Run, cfg, ctx, out, data, val_rows, epoch, stats, history, t0) -> float:
    """Validation loss and metrics of the epoch, appended to the history and logged."""
    val_loss, val_logits = validation_pass(
        run.model, data, val_rows, run.prep, cfg.precision, ctx.device
    )
    if len(val_rows) and not math.isfinite(val_loss):
        raise _diverged(out, epoch, f"the validation loss became {val_loss}")
    val_prob = probabilities(val_logits)
    val = metrics.binary_metrics(data.labels[val_rows], val_prob) if len(val_rows) else {}
    row = {
        "epoch": epoch + 1,
        "lr": run.optimizer.param_groups[0]["lr"],
        **stats,
        "val_loss": val_loss,
        "val_auc": val.get("auc"),
        "val_balanced_accuracy": val.get("balanced_accuracy"),
        "seconds": time.perf_counter() - t0,
    }
    history.append({k: row.get(k) for k in HISTORY_FIELDS})
    _write_history(out / "history.csv", history)
    logger.info(
        "epoch %d/%d  train_loss %.4f  val_loss %.4f  val_auc %s  %.0f img/s",
        epoch + 1, cfg.epochs, stats["train_loss"], val_loss, _fmt(val.get("auc")),
        stats["images_per_s"],
    )  # fmt: skip
    return val_loss


def _save(run: _Run, out: Path, epoch, val_loss, best_loss, history, keep_best: bool) -> None:
    """``best.pt`` when it is the one to keep, and the resumable ``last.pt`` every epoch."""
    if keep_best:
        save_checkpoint(out / "best.pt", run.model, **run.meta, epoch=epoch + 1, val_loss=val_loss)
    save_checkpoint(
        out / "last.pt",
        run.model,
        **run.meta,
        epoch=epoch + 1,
        best_val_loss=best_loss,
        history=history,
        optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict() if run.scheduler else {},
        generator=run.generator.get_state(),
        torch_rng=torch.get_rng_state(),
    )


def _diverged(out: Path, epoch: int, why: str) -> IdcscopeError:
    """The error that stops a run whose loss or weights stopped being finite.

    It is raised before anything of the epoch is saved, so ``last.pt`` stays the last good one.
    """
    kept = (
        f"{out / 'last.pt'} (epoch {epoch}) is the last good checkpoint"
        if epoch
        else "no checkpoint was written"
    )
    return IdcscopeError(
        f"training diverged in epoch {epoch + 1}: {why}; {kept}. "
        "Lower --lr, then --resume or start again"
    )


def _load_data(cfg: TrainConfig, ctx: DistContext, out: Path) -> tuple[PatchData, dict]:
    """Index and decode (one process per machine builds the cache first), then split."""
    if ctx.local_rank == 0:
        data = load_patch_data(cfg.data, cfg.cache_dir)
    ctx.barrier()
    if ctx.local_rank != 0:
        data = load_patch_data(cfg.data, cfg.cache_dir)
    splits = None
    if ctx.is_main:
        write_skipped(out / "skipped.csv", data.skipped)
        splits = resolve_splits(cfg, data, out)
    if ctx.enabled:
        box = [splits]
        torch.distributed.broadcast_object_list(box, src=0)
        splits = box[0]
    return data, splits


def model_kwargs(cfg: TrainConfig) -> dict:
    """The model factory's arguments: the config's, and six input channels with a
    neighbourhood (the patch, then its block of neighbours)."""
    return {**cfg.model_kwargs, **({"in_chans": 6} if cfg.neighbourhood else {})}


def _build_model(cfg: TrainConfig) -> nn.Module:
    model = create_model(
        cfg.model,
        num_classes=2,
        pretrained=cfg.pretrained,
        weights=cfg.weights,
        **model_kwargs(cfg),
    )
    if getattr(model, "frozen", False) and not (cfg.pretrained or cfg.weights):
        logger.warning(
            "%s: the backbone is frozen but not pretrained; it will learn little "
            "(pass --weights/--pretrained, or fine_tune)",
            cfg.model,
        )
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _restore(path: Path, run: _Run, ctx: DistContext) -> tuple[int, float, list]:
    ckpt = read_checkpoint(path)
    if ckpt.get("world_size", 1) != ctx.world:
        logger.warning(
            "%s was written by %d processes, resuming with %d: batches differ",
            path,
            ckpt.get("world_size", 1),
            ctx.world,
        )
    run.model.load_state_dict(ckpt["state_dict"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.scheduler is not None and ckpt.get("scheduler"):
        run.scheduler.load_state_dict(ckpt["scheduler"])
    run.generator.set_state(ckpt["generator"])
    torch.set_rng_state(ckpt["torch_rng"])  # dropout draws continue as if never interrupted
    return int(ckpt["epoch"]), float(ckpt["best_val_loss"]), list(ckpt["history"])


def _write_history(path: Path, history: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        w.writeheader()
        w.writerows(history)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"
