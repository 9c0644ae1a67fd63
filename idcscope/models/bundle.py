"""Model folders in the Hugging Face layout: ``config.json``, ``model.safetensors``, ``README.md``.

A bundle is a checkpoint taken apart for publishing: the weights as safetensors (no pickle
at all), everything else a person or a program needs as JSON (architecture,
preprocessing, threshold, temperature, spatial context, class names, the recipe), and a
model card. ``config.json`` lists the sha256 of every other file of the folder (its
``files``; the weights' also as ``weights_sha256``), all checked when the folder is read,
so a bundle is the one its card describes or it does not load; a file it does not list
is never read. What is derived from a model (its ONNX graph, the faster engine) lives in
the user's cache, never in the folder (``inference.onnx``). ``read_checkpoint`` reads a
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
MANIFEST = "files"  # config.json's {file name: sha256} of every other file of the folder
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
    name = ckpt["model"]["name"]
    (out / CARD).write_text(card if card is not None else f"# idcscope model ({name})\n")
    digests = {f: sha256_of(out / f) for f in (WEIGHTS, CARD)}
    config["weights_sha256"] = digests[WEIGHTS]  # as the card states it
    config[MANIFEST] = digests
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    return out


def read_bundle(folder: str | Path) -> dict:
    """The checkpoint dict of a bundle (``state_dict`` included), its files verified."""
    return verified_bundle(folder)[0]


def verified_bundle(folder: str | Path) -> tuple[dict, str]:
    """``(checkpoint dict, sha256 of the weights)`` of a bundle whose every listed file
    has the sha256 its ``config.json`` gives; anything else is a ``CheckpointError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from .checkpoint import FORMAT

    folder = Path(folder)
    config = read_config(folder)
    manifest = _manifest(folder, config)
    weights = b""
    for name, want in manifest.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: no {name}, which its {CONFIG} lists")
        # The weights are hashed from the very bytes that are loaded: none read in between.
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != want:
            raise CheckpointError(
                f"{path}: sha256 {digest[:16]}... is not the {want[:16]}... its {CONFIG} "
                "lists: the file was changed or damaged since the model was written"
            )
        if name == WEIGHTS:
            weights = data
    try:
        state_dict = load(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{folder / WEIGHTS}: not readable safetensors ({e})") from e
    fields = {k: v for k, v in config.items() if k not in ("format", "weights_sha256", MANIFEST)}
    return {"format": FORMAT, "state_dict": state_dict, **fields}, manifest[WEIGHTS]


def read_config(folder: str | Path) -> dict:
    """A bundle's ``config.json``, checked to be one this idcscope reads."""
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable model config ({e})") from e
    except ValueError as e:
        raise CheckpointError(f"{path}: not a readable model config: not JSON ({e})") from e
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt is None:
        raise CheckpointError(
            f"{path}: not an idcscope model config (it names no format; "
            f'a model folder\'s config.json says "format": {BUNDLE_FORMAT!r})'
        )
    if fmt != BUNDLE_FORMAT:
        raise CheckpointError(
            f"{path}: model format {fmt!r} is not one this idcscope reads ({BUNDLE_FORMAT!r}); "
            "a newer idcscope may read it"
        )
    return config


def _manifest(folder: Path, config: dict) -> dict[str, str]:
    """The files a bundle is made of and their sha256: its ``files``, or only the weights
    for a bundle written before there was a list."""
    path = folder / CONFIG
    listed = config.get(MANIFEST, {WEIGHTS: config.get("weights_sha256")})
    if not isinstance(listed, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in listed.items()
    ):
        raise CheckpointError(f"{path}: {MANIFEST!r} is not a mapping of file names to sha256")
    for name in listed:
        if name in (CONFIG, "", ".", "..") or Path(name).name != name:
            raise CheckpointError(f"{path}: lists {name!r}, not a file of its own folder")
    if not listed.get(WEIGHTS):
        raise CheckpointError(f"{path}: lists no sha256 for {WEIGHTS}")
    if config.get("weights_sha256", listed[WEIGHTS]) != listed[WEIGHTS]:
        raise CheckpointError(
            f"{path}: its weights_sha256 and its {MANIFEST!r} give {WEIGHTS} two sha256"
        )
    return listed


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
