"""Peak memory on the full 277,524-patch tree from bench_ingest.py: training and predict.

Each variant runs in a fresh subprocess and reports its peak resident set (``VmHWM``, =
``ru_maxrss``) and how much of the resident set is anonymous memory and how much is file
pages (of a memory map, and the libraries): file pages are clean page cache that the
kernel may drop at any time, anonymous memory is not.

* memmap: training cancernet with ``train_one_epoch`` for one epoch (or ``--steps``) on the
  decode cache (a cache hit), the array memory-mapped as ``idcscope train`` keeps it when
  there is no stain normalisation or neighbourhood to compute.
* in RAM: the same, the array read into process memory (``np.fromfile``, as ``np.load`` of
  an .npy or stacking decoded patches into one array would do).
* predict: ``idcscope predict CKPT`` on every PNG of the tree (``--checkpoint``), decoding
  as it scores and writing rows as they are scored: no cache at all.

Run bench_ingest.py first (with the same ``--quick`` / ``--root``).
Usage: ``python benchmarks/bench_memory.py [--quick] [--steps N] [--root DIR] [--checkpoint CKPT]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import table


def status_mb() -> dict[str, float]:
    """Resident memory of this process from /proc (Linux), in MB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) / 1024  # kB
    return fields


class PeakSampler(threading.Thread):
    """Polls /proc every 20 ms for the peaks of anonymous and file-backed resident memory."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0.0, "RssFile": 0.0}

    def run(self) -> None:
        while True:
            now = status_mb()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], now.get(k, 0.0))
            time.sleep(0.02)


def child(root: Path, cache: Path, steps: int, in_ram: bool, batch: int) -> None:
    """Load, train, print one JSON line of memory figures."""
    import numpy as np
    import torch

    from idcscope.data.augment import create_augment
    from idcscope.data.dataset import load_patch_data
    from idcscope.data.preprocess import Planes, Preprocessing
    from idcscope.models import create_model
    from idcscope.training.loop import PatchLoader, train_one_epoch

    sampler = PeakSampler()
    sampler.start()
    start_mb = status_mb()
    stages = {"after imports": start_mb["VmRSS"], "libs_file_mb": start_mb.get("RssFile")}
    data = load_patch_data(root, cache)
    images = data.images
    if in_ram:  # read(), not the map: the copy alone is resident, as with np.load
        images = np.fromfile(images.filename, np.uint8).reshape(images.shape)
        data.images = images
    stages["after load"] = status_mb()["VmRSS"]
    images = Planes(images)  # the model's layout, read through (see data.preprocess)
    rows = data.rows()
    torch.manual_seed(0)
    model = create_model("cancernet").to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = PatchLoader(images, data.labels, rows, batch, shuffle=True, drop_last=True)
    if steps:
        loader = _Limited(loader, steps)
    start = time.perf_counter()
    stats = train_one_epoch(
        model,
        loader,
        opt,
        None,
        torch.nn.CrossEntropyLoss(),
        Preprocessing(),
        create_augment("default"),
        torch.Generator().manual_seed(0),
    )
    end = status_mb()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "n_patches": len(rows),
                "images_trained": len(loader) * batch,
                "seconds": time.perf_counter() - start,
                "img_per_s": stats["images_per_s"],
                "peak_rss_mb": peak_kb / 1024,
                "peak_anon_mb": sampler.peak["RssAnon"],
                "peak_file_mb": sampler.peak["RssFile"],
                "end_anon_mb": end.get("RssAnon"),
                "end_file_mb": end.get("RssFile"),
                **stages,
                "array_gb": data.images.nbytes / 1e9,
            }
        )
    )


def predict_child(root: Path, checkpoint: Path) -> None:
    """``idcscope predict`` on every file under ``root``; one JSON line of memory figures."""
    import tempfile

    from idcscope.inference.predict import predict

    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        df = predict(checkpoint, [root], Path(tmp) / "p.csv")
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "n_patches": len(df),
                "seconds": seconds,
                "img_per_s": len(df) / seconds,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_anon_mb": sampler.peak["RssAnon"],
                "peak_file_mb": sampler.peak["RssFile"],
                "array_gb": 0.0,
            }
        )
    )


class _Limited:
    """The first ``steps`` batches of a loader."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps = loader, min(steps, len(loader))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.steps)


VARIANTS = ("memmap", "in RAM", "predict")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 steps on bench_ingest's quick tree")
    ap.add_argument("--steps", type=int, default=0, help="train N steps (0: a full epoch)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--root", type=Path, default=None, help="default /tmp/idc-ingest[-quick]")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--checkpoint", type=Path, help="the model for the predict variant")
    ap.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = args.root or Path("/tmp/idc-ingest-quick" if args.quick else "/tmp/idc-ingest")
    cache = Path(f"{root}-cache")
    steps = 20 if args.quick and not args.steps else args.steps
    if args.child == "predict":
        logging.basicConfig(level=logging.WARNING)
        predict_child(root, args.checkpoint)
        return
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        child(root, cache, steps, args.child == "in RAM", args.batch_size)
        return
    if not cache.is_dir():
        raise SystemExit(f"no cache at {cache}: run benchmarks/bench_ingest.py first")
    if "predict" in args.variants and not args.checkpoint:
        raise SystemExit("the predict variant needs --checkpoint CKPT")
    rows = []
    for variant in args.variants:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            variant,
            "--root",
            str(root),
            "--steps",
            str(steps),
            "--batch-size",
            str(args.batch_size),
            *(["--checkpoint", str(args.checkpoint)] if args.checkpoint else []),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"variant": variant, **r})
        print(f"{variant}: peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    what = f"{steps} steps" if steps else "1 epoch"
    print(
        f"\n### Peak memory, cancernet, {what} of batch {args.batch_size} on "
        f"{rows[0]['n_patches']:,} patches ({rows[0]['array_gb']:.2f} GB array)\n"
    )
    print(
        table(
            rows,
            [
                "variant",
                "peak_rss_mb",
                "peak_anon_mb",
                "peak_file_mb",
                "libs_file_mb",
                "after imports",
                "after load",
                "images_trained",
                "img_per_s",
            ],
        )
    )
    print(
        "\nMB. peak_rss_mb is ru_maxrss; peak_anon_mb (process memory) and peak_file_mb "
        "(file pages: the shared libraries, libs_file_mb, plus the memory map) are sampled "
        "every 20 ms. Mapped file pages are clean page cache the kernel may drop at any time; "
        "the kernel also maps neighbouring cached pages on each fault (fault-around), so a "
        "memory map's RSS overstates what was read. Targets: training peak RSS <= 3 GB on the "
        "full cache; predict <= 2 GB on every file of the tree."
    )


if __name__ == "__main__":
    main()
