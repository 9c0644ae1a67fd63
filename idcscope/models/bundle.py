"""Model folders in the Hugging Face layout: ``config.json``, ``model.safetensors``, ``README.md``.

A bundle is a checkpoint taken apart for publishing: the weights as safetensors (no pickle
at all), everything else a person or a program needs as JSON (architecture,
preprocessing, threshold, temperature, spatial context, class names, the recipe), and a
model card. ``config.json`` records the sha256 of the weights file, checked on every load,
so a bundle is the one its card describes or it does not load. ``read_checkpoint`` reads a
bundle folder as it reads a ``.pt``: every command that takes a checkpoint takes one.

``resolve_model`` turns what a user types after ``--model`` into a path: the name of a
bundled model, a checkpoint or ``.onnx`` file, a bundle folder, or ``hf://owner/name`` (a
Hub repository in this layout, fetched with ``huggingface_hub`` into its cache).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from importlib.resources import files
from pathlib import Path

import torch

from ..errors import CheckpointError

BUNDLE_FORMAT = "idcscope-model/1"
CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
FILES = (CONFIG, WEIGHTS, CARD)
# What a bundle keeps of a checkpoint: what scoring needs and what describes the model.
# Training state (optimiser, random generators, history) and the validation arrays stay in
# the run folder.
FIELDS = (
    "model", "class_names", "preprocessing", "threshold", "threshold_method", "temperature",
    "logit_bias", "lone_calibration", "context", "config", "splits", "data_summary", "epoch", "val_metrics",
)  # fmt: skip
HUB_PREFIX = "hf://"
DEFAULT_MODEL = "idc-default"  # what scores when no --model is given


def is_bundle(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def save_bundle(checkpoint: str | Path, out_dir: str | Path, card: str | None = None) -> Path:
    """Write the bundle of a checkpoint into ``out_dir``; returns the folder.

    ``card`` is the model card's markdown (a stub naming the model when None).
    """
    from safetensors.torch import save_file

    from .checkpoint import read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in ckpt["state_dict"].items()}
    save_file(weights, str(out / WEIGHTS), metadata={"format": BUNDLE_FORMAT})
    (out / WEIGHTS).chmod(0o644)  # safetensors writes 0600: others must read an install
    config = {"format": BUNDLE_FORMAT, **{k: _plain(ckpt[k]) for k in FIELDS if k in ckpt}}
    # Where the run was written and cached is this machine's business, not the model's.
    for local in ("out", "cache_dir"):
        config.get("config", {}).pop(local, None)
    config["weights_sha256"] = sha256_of(out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    name = ckpt["model"]["name"]
    (out / CARD).write_text(card if card is not None else f"# idcscope model ({name})\n")
    return out


def read_bundle(folder: str | Path) -> dict:
    """The checkpoint dict of a bundle (``state_dict`` included), its weights verified."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .checkpoint import FORMAT

    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG}: not a readable model config ({e})") from e
    if not isinstance(config, dict) or config.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{folder / CONFIG}: not an idcscope model (no {BUNDLE_FORMAT!r})")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS} beside {CONFIG}")
    digest = sha256_of(weights)
    if digest != config.get("weights_sha256"):
        raise CheckpointError(
            f"{weights}: sha256 {digest[:16]}... is not the {config.get('weights_sha256')!r} "
            f"its {CONFIG} describes: the weights were changed or damaged"
        )
    try:
        state_dict = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not readable safetensors ({e})") from e
    fields = {k: v for k, v in config.items() if k not in ("format", "weights_sha256")}
    return {"format": FORMAT, "state_dict": state_dict, **fields}


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bundled_models() -> dict[str, Path]:
    """The models shipped inside the package, by name."""
    root = Path(str(files("idcscope.models") / "weights"))
    return {p.name: p for p in sorted(root.iterdir()) if is_bundle(p)} if root.is_dir() else {}


def card_summary(folder: str | Path) -> list[str]:
    """The lines of a model card's summary: what follows its title, up to its first section."""
    lines = (
        (Path(folder) / CARD).read_text().splitlines() if (Path(folder) / CARD).is_file() else []
    )
    body = [ln for ln in lines[1:] if not ln.startswith("<!--")]
    end = next((i for i, ln in enumerate(body) if ln.startswith("## ")), len(body))
    return [ln for ln in body[:end] if ln.strip()]


def resolve_model(spec: str | Path) -> Path:
    """The path behind ``--model``: a bundled model's name, a file, a folder or ``hf://``."""
    text = str(spec)
    if text.startswith(HUB_PREFIX):
        return _from_hub(text[len(HUB_PREFIX) :])
    path = Path(text).expanduser()
    if path.exists():
        return path
    shipped = bundled_models()
    if text in shipped:
        return shipped[text]
    names = ", ".join(shipped) or "none"
    raise CheckpointError(
        f"{text}: no such file or folder, and no bundled model of that name (bundled: {names})"
    )


def _from_hub(repo: str) -> Path:
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise CheckpointError(f"hf://{repo}: a Hub model is hf://owner/name")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(
            f"hf://{repo}: loading from the Hub needs huggingface_hub (pip install huggingface_hub)"
        ) from e
    try:
        return Path(snapshot_download(repo, allow_patterns=list(FILES)))
    except Exception as e:  # offline, unknown repository, refused: all the user's to fix
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        hint = (
            "HF_HUB_OFFLINE=1 and it is not in the local cache"
            if offline
            else ("no network, an unknown repository, or no access")
        )
        raise CheckpointError(f"hf://{repo}: cannot fetch the model ({hint}): {e}") from e


def _plain(value):
    """JSON-ready: tensors and numpy values become lists and numbers; NaN becomes None."""
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _plain(value.tolist())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
