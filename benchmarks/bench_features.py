"""The study's frozen ResNet-50 for 20 epochs: backbone every epoch vs cached features.

* (a) every epoch: ``train_one_epoch`` runs the frozen backbone on every batch of every
  epoch (the study's recipe: augment "report", batch 32, Adam). Measured for
  ``--measure-epochs`` epochs and multiplied up to 20 unless ``--full``.
* (b1) cache once: ``extract_features`` runs the backbone once, then ``train_head`` trains
  the head for 20 epochs on the cached pooled features. No augmentation survives.
* (b8) cache 8 views: the same with all 8 dihedral transforms cached; each epoch draws one
  per patch, which keeps the dihedral augmentation exactly.

All on N real patches (default 2,048), bf16 autocast for the backbone; the last rows
scale the times linearly to the Kaggle training set (70% of 277,524 patches).
Usage: ``python benchmarks/bench_features.py [--quick] [--n 2048] [--full]``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from _common import decoded_sample, machine, setup_torch, table
from features import extract_features, train_head

from idcscope.data.augment import create_augment
from idcscope.data.preprocess import Preprocessing
from idcscope.models import create_model
from idcscope.training.loop import PatchLoader, train_one_epoch

EPOCHS, BATCH = 20, 32  # the study's recipe
KAGGLE_TRAIN = round(0.70 * 277_524)


def every_epoch(images, labels, epochs: int) -> float:
    """Seconds per epoch of (a), averaged over ``epochs`` after a short warm-up."""
    torch.manual_seed(0)
    model = create_model("resnet50").to(memory_format=torch.channels_last)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss, prep = torch.nn.CrossEntropyLoss(), Preprocessing()
    augment, gen = create_augment("report"), torch.Generator().manual_seed(0)
    rows = np.arange(len(images))
    warm = PatchLoader(images, labels, rows[: 2 * BATCH], BATCH)
    train_one_epoch(model, warm, opt, None, loss, prep, augment, gen, desc="warm-up")
    loader = PatchLoader(images, labels, rows, BATCH, shuffle=True)
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.epoch = epoch
        train_one_epoch(model, loader, opt, None, loss, prep, augment, gen, desc="(a) epoch")
    return (time.perf_counter() - start) / epochs


def cached(images, labels, views: int) -> tuple[float, float]:
    """Seconds of (b): extracting ``views`` views once, then 20 head epochs."""
    torch.manual_seed(0)
    model = create_model("resnet50").to(memory_format=torch.channels_last)
    prep = Preprocessing()
    extract_features(model, images, np.arange(BATCH), prep)  # warm-up, as for (a)
    start = time.perf_counter()
    feats = extract_features(model, images, None, prep, views=views)
    extract_s = time.perf_counter() - start
    start = time.perf_counter()
    train_head(model, feats, labels, epochs=EPOCHS, batch_size=BATCH, lr=1e-4)
    return extract_s, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 patches: checks it runs")
    ap.add_argument("--n", type=int, default=2048, help="patches of the real sample to use")
    ap.add_argument("--measure-epochs", type=int, default=1, help="epochs of (a) to time")
    ap.add_argument("--full", action="store_true", help="time all 20 epochs of (a)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/idcscope-bench-cache"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    setup_torch(args.threads)
    images, labels, _ = decoded_sample(256 if args.quick else args.n, args.cache_dir)
    n = len(images)
    k = EPOCHS if args.full else args.measure_epochs
    epoch_s = every_epoch(images, labels, k)
    a_total = epoch_s * EPOCHS
    a_note = "measured" if k == EPOCHS else f"{k} epoch(s) measured, x{EPOCHS / k:g}"
    rows = [
        {
            "variant": "(a) backbone every epoch",
            "backbone s": a_total,
            "head s": float("nan"),
            "total s": a_total,
            "how": a_note,
        }
    ]
    for views in (1, 8):
        extract_s, head_s = cached(images, labels, views)
        rows.append(
            {
                "variant": f"(b{views}) cache {views} view{'s' * (views > 1)}, train head",
                "backbone s": extract_s,
                "head s": head_s,
                "total s": extract_s + head_s,
                "how": "measured",
            }
        )
        print(f"b{views}: extract {extract_s:.1f} s, head {head_s:.1f} s", flush=True)
    for r in rows:
        r["speed-up vs (a)"] = f"{a_total / r['total s']:.1f}x"
    scale = KAGGLE_TRAIN / n
    rows += [
        {
            **r,
            "variant": f"{r['variant']}, {KAGGLE_TRAIN:,} patches",
            "backbone s": r["backbone s"] * scale,
            "head s": r["head s"] * scale,
            "total s": r["total s"] * scale,
            "how": f"extrapolated x{scale:.0f} from {n:,}",
        }
        for r in rows[:3]
    ]
    print(f"\n### Frozen ResNet-50, {EPOCHS} epochs of batch {BATCH} on {n:,} real patches\n")
    print(f"{machine()}\n")
    print(table(rows, ["variant", "backbone s", "head s", "total s", "speed-up vs (a)", "how"]))


if __name__ == "__main__":
    main()
