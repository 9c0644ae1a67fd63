"""Inference throughput per model: torch fp32, torch bf16 + channels_last, ONNX Runtime.

Every engine runs the whole path from uint8 patches (the decode cache) to logits, in
batches of 512: uint8 to float, normalisation, the model (and, as ``Predictor`` runs it,
with BatchNorm folded into the layer before it). Models are randomly initialised
(weights do not change the speed); each engine gets one warm-up batch. The ONNX export
happens before timing and is reported on its own.
Usage: ``python benchmarks/bench_infer.py [--quick] [--n 4096]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from _common import best_of, decoded_sample, machine, setup_torch, table

from idcscope.checkpoint import save_checkpoint
from idcscope.engine import Preprocessing, fuse_for_inference, predict_logits
from idcscope.export import OnnxPredictor, export_onnx
from idcscope.models import create_model, list_models


def make_checkpoint(name: str, path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(
        path,
        create_model(name).eval(),
        model={"name": name, "kwargs": {}},
        class_names=["no_idc", "idc"],
        threshold=0.5,
        preprocessing=dataclasses.asdict(Preprocessing()),
    )


def torch_engine(model, channels_last: bool, precision: str, batch: int):
    prep = Preprocessing(channels_last=channels_last)
    return lambda images, rows: predict_logits(
        model, images, rows, prep, batch, precision=precision
    )


def throughput(fn, images: np.ndarray, batch: int, repeat: int) -> float:
    """Patches per second of ``fn(images, rows)`` over every patch, best of ``repeat`` passes."""
    fn(images, np.arange(batch))  # warm-up: oneDNN and ORT prepare kernels on first use

    def one_pass() -> float:
        start = time.perf_counter()
        fn(images, np.arange(len(images)))
        return len(images) / (time.perf_counter() - start)

    return best_of(repeat, one_pass)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,024 patches: checks it runs")
    ap.add_argument("--n", type=int, default=4096, help="patches of the real sample to use")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--models", nargs="+", default=list_models(), choices=list_models())
    ap.add_argument("--threads", type=int, default=0, help="torch and ORT threads (0: all)")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes; the best counts")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/idcscope-bench-cache"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = setup_torch(args.threads)
    n, bs, rep = (1024 if args.quick else args.n), args.batch_size, 1 if args.quick else args.repeat
    images, _, _ = decoded_sample(n, args.cache_dir)
    images = np.array(images)  # in RAM: time the engines, not the page cache
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            ckpt = make_checkpoint(name, Path(tmp) / f"{name}.pt")
            t0 = time.perf_counter()
            runner = OnnxPredictor(export_onnx(ckpt, Path(tmp) / f"{name}.onnx"), threads)
            export_s = time.perf_counter() - t0
            model = create_model(name).eval()
            fp32 = throughput(torch_engine(model, False, "fp32", bs), images, bs, rep)
            model = model.to(memory_format=torch.channels_last)
            bf16 = throughput(torch_engine(model, True, "bf16", bs), images, bs, rep)
            fused = fuse_for_inference(model)  # what Predictor runs
            folded = throughput(torch_engine(fused, True, "bf16", bs), images, bs, rep)
            ort = throughput(partial(runner.predict_logits, batch_size=bs), images, bs, rep)
            rows.append(
                {
                    "model": name,
                    "torch fp32": fp32,
                    "torch bf16 + channels_last": bf16,
                    "+ BatchNorm folded": folded,
                    "ONNX Runtime fp32": ort,
                    "best vs torch fp32": f"{max(bf16, folded, ort) / fp32:.1f}x",
                    "export s": export_s,
                }
            )
            print(
                f"{name}: fp32 {fp32:.0f}, bf16 {bf16:.0f}, folded {folded:.0f}, "
                f"ort {ort:.0f} patches/s",
                flush=True,
            )
    print(f"\n### Inference patches/s ({len(images):,} real patches, batch {bs}, best of {rep})\n")
    print(f"{machine()}; ONNX Runtime {threads} intra-op threads\n")
    print(table(rows))
    print("\nTarget: cancernet >= 4,000 patches/s with the best engine.")


if __name__ == "__main__":
    main()
