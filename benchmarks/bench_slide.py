"""Whole-slide inference throughput on slides rebuilt from real sample patients.

Each patient's patches are pasted at their coordinates (4 µm/px), upsampled to a scan of
``--scan-mpp`` µm/px and written as a pyramidal TIFF (levels 1, 2, 4, 8): the slide path
then tiles, masks, reads and resizes as it would on a real scan. Reported per slide: tissue
tiles, seconds reading (thumbnail, mask, tiles), end-to-end tiles/s next to its bare limit
(reading at its own rate, then the forward pass alone at the engine's rate: a slide is
read whole before it is scored, because its stain is fitted on all its tissue), and,
because the patches carry labels, the Dice and IoU of predicted vs annotated IDC tiles.
Usage: ``python benchmarks/bench_slide.py CHECKPOINT [--patients 8951 9037] [--quick]``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import SAMPLE, machine, setup_torch, table

from idcscope.data.decode import decode_files
from idcscope.data.manifest import index_dataset
from idcscope.inference import Predictor
from idcscope.spatial.heatmap import dice_iou, patient_mosaic
from idcscope.spatial.slide import slide_inference
from idcscope.spatial.wsi import write_tiff_slide


def patient_slide(patient: str, scan_mpp: float, folder: Path):
    """Write one patient as a pyramidal TIFF; return its path and the annotated IDC cells."""
    ix = index_dataset(SAMPLE / patient)
    t = ix.table
    images = decode_files([str(ix.root / p) for p in t["path"]]).images
    mosaic, (x0, y0) = patient_mosaic(images, t["x"], t["y"])
    k = round(4.0 / scan_mpp)
    scan = np.repeat(np.repeat(mosaic, k, axis=0), k, axis=1)
    labels = {
        ((y - y0) // 50, (x - x0) // 50): c for x, y, c in zip(t.x, t.y, t.label, strict=True)
    }
    return write_tiff_slide(scan, folder / f"{patient}.tif", scan_mpp, levels=4), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--patients", nargs="+", default=["8951", "9037", "8975"])
    ap.add_argument("--scan-mpp", type=float, default=1.0, help="µm/px of the written scans")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="one patient at 2 µm/px")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    setup_torch(args.threads)
    patients, mpp = (args.patients[:1], 2.0) if args.quick else (args.patients, args.scan_mpp)
    predictor = Predictor(args.checkpoint)
    seen = predictor.seen_patients
    backend, channels = predictor.members[0].backend, predictor.members[0].prep.channels
    x = np.random.default_rng(0).integers(0, 256, (4096, channels, 50, 50), dtype=np.uint8)
    backend.logits(x[:256])
    start = time.perf_counter()
    backend.logits(x)
    forward = len(x) / (time.perf_counter() - start)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in patients:
            path, labels = patient_slide(p, mpp, Path(tmp))
            s = slide_inference(predictor, path, Path(tmp) / "out")
            tiles = pd.read_csv(s["files"]["tiles_csv"])
            cells = [(r, c) for r, c in zip(tiles["row"], tiles["col"], strict=True)]
            known = np.array([c in labels for c in cells])
            truth = np.array([labels.get(c, 0) for c in cells], bool)
            score = dice_iou(tiles["pred"].to_numpy(bool)[known], truth[known])
            read = s["n_tiles"] / s["seconds_reading"]
            limit = 1 / (1 / read + 1 / forward)
            rows.append(
                {
                    "patient": p + (" (seen in training)" if p in seen else ""),
                    "grid (tiles)": "x".join(map(str, s["grid"][::-1])) + f" tiles @ {mpp:g} µm/px",
                    "tissue tiles": s["n_tiles"],
                    "with a patch": int(known.sum()),
                    "read s": s["seconds_reading"],
                    "total s": s["seconds"],
                    "tiles/s": s["tiles_per_s"],
                    "bare limit": limit,
                    "of limit": f"{s['tiles_per_s'] / limit:.0%}",
                    "Dice": score["dice"] if score["dice"] is not None else float("nan"),
                    "IoU": score["iou"] if score["iou"] is not None else float("nan"),
                }
            )
    print(f"\nWhole-slide inference ({machine()}), {args.checkpoint}\n")
    print(f"Bare forward ({predictor.engine}): {forward:,.0f} tiles/s\n")
    print(table(rows))


if __name__ == "__main__":
    main()
