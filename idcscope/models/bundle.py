"""Model folders in the Hugging Face layout: ``config.json``, ``model.safetensors``, ``README.md``.

A bundle is a checkpoint taken apart for publishing: the weights as safetensors (no pickle
at all), everything else a person or a program needs as JSON (architecture,
preprocessing, threshold, temperature, spatial context, class names, the recipe), and a
model card. ``config.json`` lists the sha256 of every other file of the folder (its
``files``; the weights' also as ``weights_sha256``), all checked when the folder is read,
so a bundle is the one its card describes or it does not load; a file it does not list
is never read. What is derived from a model (its ONNX graph, the faster engine) lives in
the user's cache, never in the folder (``inference.onnx``). ``inference.export.save_bundle``
writes a bundle; ``models.checkpoint`` reads one as it reads a ``.pt``: every command
that takes a checkpoint takes one.

``resolve_model`` turns what a user types after ``--model`` into a path: the name of a
bundled model, a checkpoint or ``.onnx`` file, a bundle folder, or ``hf://owner/name`` (a
Hub repository in this layout, fetched with ``huggingface_hub`` into its cache).
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.resources import files
from pathlib import Path

from ..errors import CheckpointError
from .schema import FORMAT, migrate

CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
FILES = (CONFIG, WEIGHTS, CARD)
MANIFEST = "files"  # config.json's {file name: sha256} of every other file of the folder
HUB_PREFIX = "hf://"
DEFAULT_MODEL = "idc-default"  # what scores when no --model is given


def is_bundle(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def verified_files(folder: str | Path) -> tuple[dict, bytes, str]:
    """``(fields, weights, sha256 of the weights)`` of a bundle whose every listed file has
    the sha256 its ``config.json`` gives (anything else is a ``CheckpointError``): its
    checkpoint fields and the bytes of its safetensors, not parsed (``parse_weights``)."""
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
    fields = {k: v for k, v in config.items() if k not in ("format", "weights_sha256", MANIFEST)}
    return fields, weights, manifest[WEIGHTS]


def parse_weights(folder: str | Path, data: bytes) -> dict:
    """The state dict in a bundle's verified safetensors bytes."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{Path(folder) / WEIGHTS}: not readable safetensors ({e})") from e


def read_config(folder: str | Path) -> dict:
    """A bundle's ``config.json``, checked to be one this idcscope reads."""
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable model config ({e})") from e
    except ValueError as e:
        raise CheckpointError(f"{path}: not a readable model config: not JSON ({e})") from e
    if not isinstance(config, dict) or config.get("format") is None:
        raise CheckpointError(
            f"{path}: not an idcscope model config (it names no format; "
            f'a model folder\'s config.json says "format": {FORMAT!r})'
        )
    return migrate(config, path)


def update_config(folder: str | Path, **fields) -> Path:
    """Add or replace fields of a model folder's ``config.json`` (``ModelMeta``'s only), as
    ``update_checkpoint`` does a ``.pt``'s: the files it lists are untouched, so the folder
    still verifies. Written atomically; returns the folder."""
    import dataclasses

    from ..data.cache import write_atomic
    from .schema import ModelMeta, plain

    folder = Path(folder)
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(ModelMeta)})
    if unknown:
        raise ValueError(f"{folder}: {unknown} are not fields of a model (models.schema.ModelMeta)")
    if not is_bundle(folder):
        raise CheckpointError(f"{folder}: not a model folder (no {CONFIG})")
    config = read_config(folder)
    own = ("weights_sha256", MANIFEST)  # last, where ``save_bundle`` writes them
    config = {
        **{k: v for k, v in config.items() if k not in own},
        **plain(fields),
        **{k: config[k] for k in own if k in config},
    }
    write_atomic(folder / CONFIG, json.dumps(config, indent=2) + "\n")
    return folder


def write_card(folder: str | Path, text: str) -> Path:
    """Write a model folder's card again, and its sha256 into ``config.json``'s list, so
    the folder still verifies."""
    from ..data.cache import write_atomic

    folder = Path(folder)
    config = json.loads((folder / CONFIG).read_text())
    write_atomic(folder / CARD, text)
    config.setdefault(MANIFEST, {})[CARD] = sha256_of(folder / CARD)
    write_atomic(folder / CONFIG, json.dumps(config, indent=2) + "\n")
    return folder


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
