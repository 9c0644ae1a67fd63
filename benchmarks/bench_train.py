"""Training throughput: the bare model step, the idcscope pipeline, and a naive PNG pipeline.

Per model, in one run and on the same N real 50x50 patches:

* (a) bare step: forward, loss, backward and AdamW step on pre-made, normalised
  channels_last batches at the "auto" precision (bf16 autocast where the CPU computes bf16
  natively, fp32 elsewhere); no data work at all.
* (b) idcscope: ``train_one_epoch`` over a ``PatchLoader`` on the memory-mapped uint8 decode
  cache, batched "default" augmentation, normalisation, the same step as (a).
* (c) naive: a torch ``DataLoader`` over the PNG files, PIL decoding and per-sample
  torchvision transforms (RandomRotation(90), flips, ToTensor, Normalize), fp32 step,
  contiguous layout; with 0 and 2 worker processes.

Overhead of (b) over (a) is the extra time per image, ``a / b - 1``; speed-up is
``b / best(c)``. Passes of (a) and (b) alternate and the best of each counts: on a shared
virtual machine two runs of the same step differ by up to 25%. Usage: ``python benchmarks/bench_train.py [--quick] [--n 4096]``.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from _common import best_of, decoded_sample, machine, setup_torch, table

from idcscope.data.augment import create_augment
from idcscope.data.preprocess import Preprocessing, to_float
from idcscope.models import create_model
from idcscope.models.runtime import autocast
from idcscope.training.loop import PatchLoader, train_one_epoch

MODELS = {
    "cancernet": "cancernet",
    "resnet18": "resnet18",
    "efficientnet_b0": "efficientnet_b0",
    "resnet50-frozen": "resnet50",
}
PREP = Preprocessing()  # ImageNet statistics: the values do not change the speed


def build(name: str, channels_last: bool):
    torch.manual_seed(0)
    model = create_model(MODELS[name])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    return model.train(), torch.optim.AdamW(params, lr=1e-3), nn.CrossEntropyLoss()


def step(model, opt, loss_fn, x, y, precision: str) -> None:
    with autocast(precision):
        logits = model(x)
    loss = loss_fn(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bare_pass(name: str, images, labels, batch: int, steps: int):
    """(a): the step alone, cycling over a few batches already in model layout."""
    model, opt, loss_fn = build(name, channels_last=True)
    batches = [
        (PREP(to_float(np.array(images[s : s + batch]))), torch.from_numpy(labels[s : s + batch]))
        for s in range(0, 4 * batch, batch)
    ]
    for x, y in batches[:2]:  # warm-up: oneDNN builds its kernels on first use
        step(model, opt, loss_fn, x, y, "auto")

    def one_pass() -> float:
        start = time.perf_counter()
        for x, y in itertools.islice(itertools.cycle(batches), steps):
            step(model, opt, loss_fn, x, y, "auto")
        return steps * batch / (time.perf_counter() - start)

    return one_pass


def pipeline_pass(name: str, images, labels, batch: int):
    """(b): epochs of ``train_one_epoch`` over the uint8 cache."""
    model, opt, loss_fn = build(name, channels_last=True)
    augment, gen = create_augment("default"), torch.Generator().manual_seed(0)
    rows = np.arange(len(images))
    warm = PatchLoader(images, labels, rows[: 2 * batch], batch)
    train_one_epoch(model, warm, opt, None, loss_fn, PREP, augment, gen, desc="warm-up")
    loader = PatchLoader(images, labels, rows, batch, shuffle=True, drop_last=True)

    def one_epoch() -> float:
        loader.epoch += 1
        return train_one_epoch(
            model, loader, opt, None, loss_fn, PREP, augment, gen, desc=f"{name} pipeline"
        )["images_per_s"]

    return one_epoch


class PngDataset(torch.utils.data.Dataset):
    """The usual tutorial dataset: open, decode and transform one PNG per item."""

    def __init__(self, paths: list[str], labels: np.ndarray, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), int(self.labels[i])


def naive_rate(name: str, paths: list[str], labels, batch: int, workers: int, repeat: int) -> float:
    """(c): DataLoader over PNGs with per-sample torchvision transforms, fp32, NCHW."""
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.RandomRotation(90),
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.ToTensor(),
            T.Normalize(PREP.mean, PREP.std),
        ]
    )
    model, opt, loss_fn = build(name, channels_last=False)
    for x, y in torch.utils.data.DataLoader(PngDataset(paths[: 2 * batch], labels, tf), batch):
        step(model, opt, loss_fn, x, y, "fp32")  # warm-up, as for (a) and (b)
    loader = torch.utils.data.DataLoader(
        PngDataset(paths, labels, tf), batch, shuffle=True, num_workers=workers, drop_last=True
    )

    def one_epoch() -> float:
        seen, start = 0, time.perf_counter()  # worker start-up counts: a user waits for it too
        for x, y in loader:
            step(model, opt, loss_fn, x, y, "fp32")
            seen += len(y)
        return seen / (time.perf_counter() - start)

    return best_of(repeat, one_epoch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 patches, batch 32: checks it runs")
    ap.add_argument("--n", type=int, default=4096, help="patches of the real sample to use")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    ap.add_argument("--repeat", type=int, default=1, help="epochs per variant; the best counts")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/idcscope-bench-cache"))
    args = ap.parse_args()
    n, bs = (128, 32) if args.quick else (args.n, args.batch_size)
    setup_torch(args.threads)
    from idcscope._compat import ensure_torchvision

    ensure_torchvision()
    images, labels, paths = decoded_sample(n, args.cache_dir)
    rows = []
    for name in args.models:
        # (a) and (b) alternate, so a slow spell of the machine hits both alike.
        a_pass = bare_pass(name, images, labels, bs, len(images) // bs)
        b_pass = pipeline_pass(name, images, labels, bs)
        rates = [(a_pass(), b_pass()) for _ in range(args.repeat)]
        a, b = max(r[0] for r in rates), max(r[1] for r in rates)
        c0 = naive_rate(name, paths, labels, bs, 0, args.repeat)
        c2 = naive_rate(name, paths, labels, bs, 2, args.repeat)
        rows.append(
            {
                "model": name,
                "(a) bare step img/s": a,
                "(b) idcscope img/s": b,
                "(c) naive w=0 img/s": c0,
                "(c) naive w=2 img/s": c2,
                "overhead (b) vs (a)": f"{100 * (a / b - 1):+.1f}%",
                "speed-up (b) vs best (c)": f"{b / max(c0, c2):.1f}x",
            }
        )
        print(f"{name}: a {a:.0f}, b {b:.0f}, c0 {c0:.0f}, c2 {c2:.0f} img/s", flush=True)
    print(
        f"\n### Training img/s ({len(images):,} real patches, batch {bs}, best of {args.repeat})\n"
    )
    print(f"{machine()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
