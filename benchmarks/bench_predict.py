"""Scoring whole patients end to end against the bare limit of the same checkpoint.

The bare limit is what decoding and the forward pass alone allow when they share the
cores: PNG decode on every core (``D`` patches/s) and the forward pass of the fastest
engine on model input made beforehand (``F`` patches/s), so ``1 / (1/D + 1/F)``; it is
also measured directly, both running at once on the worker threads with nothing else
to do and nothing to wait for (no stain, neighbourhood, context or table). End to
end is ``idcscope predict`` (and ``evaluate``) on the same folders, everything included:
indexing, decoding, per-patient stain normalisation, the neighbourhood input, the
forward pass, spatial context and writing the table; ``evaluate`` is given once whole
and once less what it writes once a run whatever its size (figures, tables, report),
so that its rate per patch can be read against the limit. "Before" runs the same command from
another checkout (``--before PATH``, e.g. a ``git worktree`` of an older commit) in the
same run. Every figure is the best of ``--repeat`` rounds, each round measuring everything once.

Usage: ``python benchmarks/bench_predict.py CKPT [--data DIR ...] [--before PATH] [--quick]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import CORES, REPO, SAMPLE, machine, table

from idcscope.data.decode import decode_into
from idcscope.data.manifest import index_files
from idcscope.inference import Predictor
from idcscope.inference.backends import OnnxBackend, TorchBackend, onnx_backend
from idcscope.inference.graphs import open_graph
from idcscope.inference.predict import predict

_BEFORE = """
import sys, time
sys.path.insert(0, sys.argv[1])
from idcscope.{module} import {function}
args = {args}
start = time.perf_counter()
{function}(*args, **{kwargs})
print(time.perf_counter() - start)
"""


def bare_decode(paths: list[str], threads: int, pillow: bool = False) -> float:
    """Patches/s of decoding ``paths`` on ``threads`` threads, nothing else."""
    from concurrent.futures import ThreadPoolExecutor

    from idcscope.data import decode

    chunks = [paths[s : s + 256] for s in range(0, len(paths), 256)]

    def one(chunk):
        out = np.empty((len(chunk), 50, 50, 3), np.uint8)
        if pillow:  # the decoder before: Pillow for every file
            for i, p in enumerate(chunk):
                out[i] = decode._decode_pillow(p, 50)[0]
        else:
            decode_into(chunk, out)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, chunks))
    return len(paths) / (time.perf_counter() - start)


def bare_forward(backend, x: np.ndarray) -> float:
    backend.logits(x[:256])  # warm-up
    start = time.perf_counter()
    backend.logits(x)
    return len(x) / (time.perf_counter() - start)


def both_at_once(paths: list[str], x: np.ndarray, backend) -> float:
    """Patches/s of decoding ``paths`` and forwarding ``x`` at the same time: decode chunks
    and forward batches interleaved at one priority on the worker threads (each patch
    decoded once and forwarded once, nothing waiting on anything)."""
    from idcscope.inference.workers import DECODE, workers

    pool, step = workers(), 256
    start = time.perf_counter()
    futures = []
    for s in range(0, len(paths), step):
        chunk = np.empty((len(paths[s : s + step]), 50, 50, 3), np.uint8)
        futures.append(pool.submit((DECODE, 0), decode_into, paths[s : s + step], chunk))
        futures.append(pool.submit((DECODE, 0), backend.logits, x[s : s + step]))
    for f in futures:
        f.result()
    return len(paths) / (time.perf_counter() - start)


def stage_rates(predictor: Predictor, paths: list[str], groups, coords) -> dict:
    """Patches/s of each preprocessing step on one core (the cost next to decode)."""
    import dataclasses

    from threadpoolctl import threadpool_limits

    from idcscope.data.grid import smooth_rows

    with threadpool_limits(limits=1, user_api="blas"):  # as the scoring pipeline runs it
        return _stage_rates(predictor, paths, groups, coords, dataclasses, smooth_rows)


def _stage_rates(predictor, paths, groups, coords, dataclasses, smooth_rows) -> dict:
    n = len(paths)
    patches = np.empty((n, 50, 50, 3), np.uint8)
    decode_into(paths, patches)
    prep = predictor.members[0].prep
    rates = {}
    for name, p in (
        ("stain", dataclasses.replace(prep, neighbourhood=0)),
        ("stain + neighbourhood", prep),
    ):
        start = time.perf_counter()
        p.model_input(patches, groups, coords)
        rates[name] = n / (time.perf_counter() - start)
    logits = np.random.default_rng(0).normal(size=(n, 2))
    start = time.perf_counter()
    smooth_rows(logits, groups, coords, predictor.models[0].context)
    rates["spatial context"] = n / (time.perf_counter() - start)
    return rates


def interleaved(measures: dict, repeat: int) -> dict:
    """The best rate of each measure over ``repeat`` rounds, each round running every
    measure once: a machine whose speed drifts over minutes slows them all alike."""
    best = dict.fromkeys(measures, 0.0)
    for _ in range(max(repeat, 1)):
        for name, fn in measures.items():
            best[name] = max(best[name], fn())
    return best


def run_before(before: Path, module: str, function: str, args: list, kwargs: dict) -> float:
    code = _BEFORE.format(module=module, function=function, args=args, kwargs=kwargs)
    env = {**os.environ, "PYTHONPATH": str(before)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(before)], env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"the 'before' run failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, nargs="+", default=[SAMPLE], help="patient folders' root")
    ap.add_argument("--before", type=Path, help="an older checkout to run the same commands from")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 patients, 1 pass")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    folders = [p for d in args.data for p in sorted(d.iterdir()) if p.is_dir()]
    if args.quick:
        folders, args.repeat = folders[:2], 1
    table_ = index_files(folders).table
    paths = list(table_["path"])
    groups = table_["patient"].to_numpy()
    coords = (table_["x"].to_numpy(), table_["y"].to_numpy())
    n = len(paths)
    print(f"{n:,} patches of {len(set(groups))} patients; {machine()}", flush=True)

    predictor = Predictor(args.checkpoint)  # the default engine: the faster here
    prep = predictor.members[0].prep
    x = prep.model_input(_decoded(paths), groups, coords)
    from idcscope.models.checkpoint import load_model

    model, _ = load_model(args.checkpoint)
    torch_backend, onnx_ = TorchBackend(model, prep), onnx_backend(args.checkpoint)
    inline = OnnxBackend(open_graph(args.checkpoint, threads=1))  # runs in its caller
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "p.csv"
        measures = {
            "decode": lambda: bare_decode(paths, CORES),
            "pillow": lambda: bare_decode(paths, CORES, pillow=True),
            "torch fp32": lambda: bare_forward(torch_backend, x),
            "ONNX Runtime fp32": lambda: bare_forward(onnx_, x),
            "both": lambda: both_at_once(paths, x, inline),
            "predict": lambda: n / _timed(lambda: predict(predictor, folders, csv)),
        }
        if len(args.data) == 1 and not args.quick:
            ev_n, outputs = len(index_files([args.data[0]]).table), TimedEvaluate()
            measures["evaluate"] = lambda: (
                ev_n
                / outputs.evaluate(predictor.paths[0], args.data[0], Path(tmp) / "ev", n_boot=0)
            )
            measures["evaluate, less its outputs"] = lambda: ev_n / outputs.scoring
        if args.before:
            call = [str(args.checkpoint), list(map(str, folders)), str(Path(tmp) / "b.csv")]
            for label, kw in (("torch, its default", {}), ("--engine onnx", {"engine": "onnx"})):
                measures[f"before ({label})"] = functools.partial(
                    lambda kw: n / run_before(args.before, "predict", "predict", call, kw), kw
                )
        rate = interleaved(measures, args.repeat)
    decode_rate, pillow_rate, concurrent, e2e = (
        rate.pop(k) for k in ("decode", "pillow", "both", "predict")
    )
    evaluate_rate = rate.pop("evaluate", None)
    evaluate_scoring = rate.pop("evaluate, less its outputs", None)
    forward = {k: rate.pop(k) for k in ("torch fp32", "ONNX Runtime fp32")}
    before = rate
    best_engine = max(forward, key=forward.get)
    formula = 1 / (1 / decode_rate + 1 / forward[best_engine])
    # On a machine whose cores are hyperthreads of one another, decoding beside a forward
    # pass beats two forward passes side by side: the measured limit can pass the formula.
    limit = max(formula, concurrent)
    before_limit = 1 / (1 / pillow_rate + 1 / forward[best_engine])

    rows = [
        {"step": "decode, every core (libpng via imagecodecs)", "patches/s": decode_rate},
        {"step": "decode, every core (Pillow: before)", "patches/s": pillow_rate},
        *({"step": f"forward, {k} (model input ready)", "patches/s": v} for k, v in forward.items()),
        {"step": f"decode + {best_engine} sharing the cores, 1 / (1/D + 1/F)",
         "patches/s": formula},
        {"step": "the same, measured: both at once on the workers", "patches/s": concurrent},
        {"step": "**bare limit**: the higher of the two", "patches/s": limit},
        {"step": "bare limit with Pillow decode (before)", "patches/s": before_limit},
        {"step": f"**predict end to end** (engine {predictor.engine})", "patches/s": e2e,
         "of limit": f"{e2e / limit:.0%}"},
    ]  # fmt: skip
    if evaluate_rate:
        rows.append({"step": "evaluate end to end (metrics and plots included)",
                     "patches/s": evaluate_rate, "of limit": f"{evaluate_rate / limit:.0%}"})  # fmt: skip
        rows.append({"step": f"evaluate less its figures, tables and report ({outputs.seconds:.1f} s a run)",
                     "patches/s": evaluate_scoring, "of limit": f"{evaluate_scoring / limit:.0%}"})  # fmt: skip
    for label, rate in before.items():
        rows.append({"step": f"predict end to end, {label}", "patches/s": rate,
                     "of limit": f"{rate / limit:.0%}"})  # fmt: skip
    print(f"\n### Scoring {n:,} patches of whole patients ({', '.join(map(str, args.data))})\n")
    print(table(rows, ["step", "patches/s", "of limit"]))
    stages = stage_rates(predictor, paths, groups, coords)
    print(
        "\nOne core, per step (patches/s): " + json.dumps({k: round(v) for k, v in stages.items()})
    )


class TimedEvaluate:
    """``evaluate`` with the time it spends writing its outputs (figures, tables, report:
    a cost per run, not per patch) taken apart from the rest."""

    def __init__(self):
        from idcscope.evaluation import evaluate as module

        self.module, self.write = module, module._write_outputs
        self.seconds = self.scoring = 0.0

    def evaluate(self, *args, **kwargs) -> float:
        """Seconds of one ``evaluate(*args, **kwargs)``, all of it."""

        def timed_write(*a, **k):
            start = time.perf_counter()
            self.write(*a, **k)
            self.seconds = time.perf_counter() - start

        self.module._write_outputs = timed_write
        try:
            total = _timed(lambda: self.module.evaluate(*args, **kwargs))
        finally:
            self.module._write_outputs = self.write
        self.scoring = total - self.seconds
        return total


def _decoded(paths: list[str]) -> np.ndarray:
    out = np.empty((len(paths), 50, 50, 3), np.uint8)
    decode_into(paths, out)
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "benchmarks"))
    main()
