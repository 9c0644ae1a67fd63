"""Forward throughput per model and engine: torch fp32, torch bf16 + channels_last, ONNX Runtime.

Every engine runs the Predictor's own backends (``inference.backends``) from uint8 model
input to logits: torch with BatchNorm folded into the layer before it (fp32, and bf16
autocast where the CPU computes bf16 natively), and ONNX Runtime on the exported graph,
each batch on one thread with one batch per core at once. Models are randomly
initialised (weights do not change the speed); each engine gets one warm-up pass. The
ONNX export happens before timing and is reported on its own. Decoding and preprocessing
are not included: ``bench_predict.py`` measures the whole path.
Usage: ``python benchmarks/bench_infer.py [--quick] [--n 4096]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import best_of, decoded_sample, machine, setup_torch, table

from idcscope.data.preprocess import Preprocessing
from idcscope.inference.backends import TorchBackend, onnx_backend
from idcscope.inference.export import export_onnx
from idcscope.models import create_model, list_models
from idcscope.models.checkpoint import save_checkpoint
from idcscope.models.runtime import resolve_precision


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


def throughput(backend, x: np.ndarray, repeat: int) -> float:
    """Patches per second of ``backend.logits`` over every patch, best of ``repeat`` passes."""
    backend.logits(x[:256])  # warm-up: oneDNN and ORT prepare kernels on first use

    def one_pass() -> float:
        start = time.perf_counter()
        backend.logits(x)
        return len(x) / (time.perf_counter() - start)

    return best_of(repeat, one_pass)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,024 patches: checks it runs")
    ap.add_argument("--n", type=int, default=4096, help="patches of the real sample to use")
    ap.add_argument("--models", nargs="+", default=list_models(), choices=list_models())
    ap.add_argument("--threads", type=int, default=0, help="torch and ORT threads (0: all)")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes; the best counts")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/idcscope-bench-cache"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = setup_torch(args.threads)
    n, rep = (1024 if args.quick else args.n), 1 if args.quick else args.repeat
    images, _, _ = decoded_sample(n, args.cache_dir)
    x = images[np.arange(len(images))]  # in RAM: time the engines, not the page cache
    bf16 = resolve_precision("auto") == "bf16"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            ckpt = make_checkpoint(name, Path(tmp) / f"{name}.pt")
            t0 = time.perf_counter()
            graph = export_onnx(ckpt)
            export_s = time.perf_counter() - t0
            model, prep = create_model(name).eval(), Preprocessing()
            row = {"model": name}
            row["torch fp32"] = throughput(TorchBackend(model, prep), x, rep)
            if bf16:
                row["torch bf16"] = throughput(TorchBackend(model, prep, precision="bf16"), x, rep)
            row["ONNX Runtime fp32"] = throughput(onnx_backend(graph, threads=threads), x, rep)
            best = max(v for k, v in row.items() if k != "model")
            row["best vs torch fp32"] = f"{best / row['torch fp32']:.1f}x"
            row["export s"] = export_s
            rows.append(row)
            print(", ".join(f"{k} {v:.0f}" for k, v in row.items() if isinstance(v, float)))
    print(f"\n### Forward patches/s ({len(x):,} real patches, best of {rep})\n")
    print(f"{machine()}; ONNX Runtime: {threads} batches at once, one thread each\n")
    print(table(rows))
    print("\nTarget: cancernet >= 4,000 patches/s with the best engine.")


if __name__ == "__main__":
    main()
