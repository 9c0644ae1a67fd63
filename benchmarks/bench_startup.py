"""What a user waits for before any real work: the console script end to end, seconds.

Each command runs as a user types it, in a fresh process: ``--help``, ``predict`` of a
wrong path (rejected before the heavy imports), ``predict`` of one real patch of the
sample with the shipped model, once with an empty cache (the ONNX graph is exported and
the engine timed) and once with the cache warm (what every later run pays). "Before"
runs the same commands from another checkout (``--before PATH``, e.g. a ``git worktree``
of an older commit), in the same run, with a cache of its own. Every figure is the best
of ``--repeat`` runs (others on the machine only ever make a run slower); the cold run
is made once.

Usage: ``python benchmarks/bench_startup.py [--before PATH] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, SAMPLE, machine, table


def seconds(checkout: Path, args: list[str], cache: Path, expect: int = 0) -> float:
    """Wall time of ``idcscope ARGS`` run from ``checkout`` in a fresh interpreter, which
    must exit with ``expect``."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "IDCSCOPE_CACHE": str(cache)}
    code = "import sys; from idcscope.cli import app; sys.argv[0] = 'idcscope'; app()"
    start = time.perf_counter()
    # -P: not the working directory first on sys.path, so the checkout named is what runs.
    command = [sys.executable, "-P", "-c", code, *args]
    done = subprocess.run(command, env=env, capture_output=True)
    took = time.perf_counter() - start
    if done.returncode != expect:
        raise SystemExit(
            f"idcscope {' '.join(args)} exited {done.returncode}, not {expect}, from {checkout}:\n"
            f"{done.stderr.decode()[-2000:]}"
        )
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, help="an older checkout to run the same commands from")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    patch = next(iter(sorted(SAMPLE.rglob("*.png"))), None)
    if patch is None:
        raise SystemExit(f"real sample not found at {SAMPLE}; set IDC_SAMPLE")
    checkouts = {"now": REPO, **({"before": args.before.resolve()} if args.before else {})}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "one.csv")
        commands = {
            "--help": ["--help"],
            "predict of a wrong path": ["predict", str(Path(tmp) / "missing"), "--out", out],
            "predict of 1 patch, empty cache": ["predict", str(patch), "--out", out],
            "predict of 1 patch, cache warm": ["predict", str(patch), "--out", out],
        }
        for what, command in commands.items():
            row = {"command": what}
            for name, checkout in checkouts.items():
                cache = Path(tmp) / f"cache-{name}"
                repeat = 1 if "empty" in what else args.repeat
                expect = 2 if "wrong" in what else 0  # a missing path: a usage error
                row[f"{name} (s)"] = min(
                    seconds(checkout, command, cache, expect) for _ in range(repeat)
                )
            rows.append(row)
    print(f"# Start-up, {machine()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
