"""Self-describing checkpoints that load without unpickling code.

A checkpoint is a plain dict of tensors and primitive values written by ``torch.save`` and
read with ``torch.load(weights_only=True)``: the weights, the model's name and arguments,
the training config, class names, preprocessing (mean, std, patch size, microns per pixel),
the decision threshold chosen on validation, the split, and, in ``last.pt``, the optimiser
state needed to resume. ``predict`` needs nothing but the file.

A model is read, and its weights hashed, once per process: reads are remembered by the
file's identity (resolved path, inode, size, modification time), so the commands and the
server that ask for a model several times while they start get it from memory.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
import pickle
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from .schema import FORMAT, OLD_FORMATS, TRAINING_STATE, ModelMeta, migrate

if TYPE_CHECKING:  # torch is imported where tensors are made: a model folder's fields,
    import torch.nn as nn  # its sha256 and its ONNX graph are read without it

logger = logging.getLogger(__name__)

EXPECTED = "a .pt checkpoint, an .onnx graph or a model folder with config.json"
_KEEP = 4  # models remembered per process: an ensemble's members, a server's one


def save_checkpoint(path: str | Path, module: nn.Module, **fields) -> Path:
    """Write the module's weights, the model's fields (``schema.ModelMeta``) and any
    training state (``schema.TRAINING_STATE``) atomically (temp file, then rename)."""
    if "config" in fields and dataclasses.is_dataclass(fields["config"]):
        fields["config"] = dataclasses.asdict(fields["config"])
    return _atomic_save(_checked(path, {**fields, "state_dict": module.state_dict()}), Path(path))


def update_checkpoint(path: str | Path, **fields) -> Path:
    """Add or replace fields of an existing checkpoint, weights untouched."""
    return _atomic_save(_checked(path, {**read_checkpoint(path), **fields}), Path(path))


def update_model(path: str | Path, **fields) -> Path:
    """Add or replace fields of a made model: a ``.pt`` (`update_checkpoint`) or a model
    folder (its ``config.json``, ``bundle.update_config``); an ONNX graph's are written
    once, at export, and are refused."""
    from .bundle import is_bundle, update_config

    path = Path(path)
    if path.suffix == ".onnx":
        raise CheckpointError(
            f"{path}: an ONNX graph's fields are written once, at export: write them into "
            "the checkpoint it was exported from, then export it again"
        )
    return (update_config if is_bundle(path) else update_checkpoint)(path, **fields)


def _checked(path, ckpt: dict) -> dict:
    """``ckpt`` in this schema's format, once each of its fields is one ``ModelMeta``
    names or training state (any other would be lost on export: a bug, refused here).
    Fields not yet fitted stay absent (a run killed before its threshold has none)."""
    known = {f.name for f in dataclasses.fields(ModelMeta)} | set(TRAINING_STATE)
    unknown = sorted(set(ckpt) - known - {"format"})
    if unknown:
        raise ValueError(f"{path}: {unknown} are not fields of a model (models.schema.ModelMeta)")
    return {"format": FORMAT, **{k: v for k, v in ckpt.items() if k != "format"}}


def _atomic_save(obj: dict, path: Path) -> Path:
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)  # a killed run leaves the previous checkpoint intact
    return path


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict of a ``.pt`` file or of a model folder (``models.bundle``)."""
    entry = _read(Path(path))
    ckpt, weights = _fields(entry), entry.state_dict()
    # The caller's own dict: the tensors are shared, since nothing writes into them.
    return ckpt if weights is None else {**ckpt, "state_dict": dict(weights)}


def read_fields(path: str | Path) -> dict:
    """Every field of a checkpoint but its weights (a model folder's are not even parsed:
    scoring a cached ONNX graph needs neither them nor torch)."""
    return _fields(_read(Path(path)))


def _fields(entry: _Read) -> dict:
    return {k: copy.deepcopy(v) for k, v in entry.ckpt.items() if k != "state_dict"}


def weights_sha256(path: str | Path) -> str:
    """sha256 of a model's weights: of a model folder's ``model.safetensors`` (verified
    when read), of a ``.pt``'s tensors by name (copies that differ only in other fields,
    a threshold or a history, share it)."""
    entry = _read(Path(path))
    if entry.sha256 is None:
        state_dict = entry.state_dict()
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"{path}: not a complete checkpoint (no state_dict)")
        entry.sha256 = tensors_sha256(state_dict)
    return entry.sha256


def tensors_sha256(state_dict: dict) -> str:
    import torch

    h = hashlib.sha256()
    for name, value in sorted(state_dict.items()):
        h.update(f"{name}\0".encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}\0".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


@dataclasses.dataclass
class _Read:
    ckpt: dict
    sha256: str | None  # of the weights; a .pt's is computed when first asked for
    folder: Path | None = None  # a model folder, whose weights are parsed when first asked for
    weights: bytes | None = None  # its verified safetensors until then

    def state_dict(self) -> dict | None:
        if self.folder is not None and "state_dict" not in self.ckpt:
            from .bundle import parse_weights

            with _LOCK:  # parsed once: every reader shares the tensors
                if "state_dict" not in self.ckpt:
                    self.ckpt["state_dict"] = parse_weights(self.folder, self.weights)
                    self.weights = None
        return self.ckpt.get("state_dict")


_READS: OrderedDict[tuple, _Read] = OrderedDict()
_LOCK = threading.Lock()


def _read(path: Path) -> _Read:
    from .bundle import is_bundle, verified_files

    bundle = is_bundle(path)
    if not bundle and not path.is_file():
        if path.is_dir():
            raise CheckpointError(
                f"{path}: checkpoint not found: a folder without config.json is not a model "
                f"folder (expected {EXPECTED})"
            )
        raise CheckpointError(f"{path}: checkpoint not found")
    try:  # a folder's every file: a change to any of them is a new read
        key = tuple(_stamp(f) for f in (sorted(path.iterdir()) if bundle else [path]))
    except OSError as e:
        raise CheckpointError(f"{path}: not readable ({e})") from e
    with _LOCK:
        if key in _READS:
            _READS.move_to_end(key)
            return _READS[key]
    if bundle:
        fields, weights, sha256 = verified_files(path)
        entry = _Read({"format": FORMAT, **fields}, sha256, path, weights)
    else:
        entry = _Read(_load_pt(path), None)
    # A training state is read once, to resume, and its optimiser then updates the
    # tensors it was given in place: it is not kept.
    if "optimizer" not in entry.ckpt:
        with _LOCK:
            _READS[key] = entry
            while len(_READS) > _KEEP:
                _READS.popitem(last=False)
    return entry


def _stamp(path: Path) -> tuple:
    """What tells one version of a file from another without reading it."""
    try:
        st = path.stat()
    except FileNotFoundError:  # a dangling link: nothing the model is made of
        return (str(path), None)
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _load_pt(path: Path) -> dict:
    unsafe = f"{path}: not a safe idcscope checkpoint"
    try:
        with path.open("rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(f"{path}: not readable ({e})") from e
    # torch.save writes a zip archive, or (before torch 1.6) a pickle: anything else is
    # another kind of file, and torch's own error about it would be a riddle.
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise CheckpointError(f"{unsafe}: it is {_kind(head)}, where idcscope expects {EXPECTED}")
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{unsafe}: it holds pickled Python objects other than tensors and plain values "
            f"({_refused(e)}); unpickling those can run any code, so idcscope refuses to load "
            "it. Use a checkpoint idcscope wrote, or a model folder (weights as safetensors)."
        ) from e
    except Exception as e:  # torch raises RuntimeError and others for damaged archives
        first = str(e).split(". ")[0].strip()
        raise CheckpointError(
            f"{unsafe}: a damaged or truncated PyTorch file ({type(e).__name__}: {first})"
        ) from e
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt not in (FORMAT, *OLD_FORMATS):
        of = f"of format {fmt!r}" if isinstance(fmt, str) else "without a format"
        raise CheckpointError(
            f"{path}: not an idcscope checkpoint: a PyTorch file {of}, where idcscope reads "
            f"{FORMAT!r} and older (a model idcscope did not write, or a newer idcscope did)"
        )
    return migrate(ckpt, path)


def _kind(head: bytes) -> str:
    if not head:
        return "an empty file"
    text = head.decode("utf-8", "ignore")  # 64 bytes may end inside a character
    if all(c.isprintable() or c in "\t\r\n" for c in text):
        return "a text file"
    return "neither a zip archive nor a pickle, the files torch.save writes"


def _refused(e: Exception) -> str:
    """What torch's weights-only unpickler refused, out of its long advice."""
    text = str(e)
    _, found, rest = text.partition("WeightsUnpickler error:")
    if not found:
        return type(e).__name__
    detail = rest.strip().split("\n")[0].split(" was not an allowed")[0]
    return detail.rstrip(". ") or type(e).__name__


def read_meta(path: str | Path) -> ModelMeta:
    """What a checkpoint or model folder says of its model, checked (``schema.ModelMeta``):
    everything scoring reads before any weights (a model folder's are not even parsed)."""
    return _meta(read_fields(path), path)


def _meta(fields: dict, path) -> ModelMeta:
    from ..data.preprocess import Preprocessing

    meta = ModelMeta.from_fields(fields, path)
    try:
        Preprocessing(**meta.preprocessing)
        if not isinstance(meta.model["name"], str) or len(meta.class_names) < 2:
            raise ValueError("no model name, or fewer than two classes")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(_unbuildable(path, e)) from e
    return meta


def load_model(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes; returns ``(model in eval mode, checkpoint)``."""
    from ..errors import IdcscopeError
    from ._factory import create_model

    ckpt = read_checkpoint(path)  # the caller's own dict
    meta = _meta(ckpt, path)
    if "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a complete checkpoint (no state_dict)")
    spec = meta.model
    try:
        # Weights come from the checkpoint alone: its arguments may not fetch or read others.
        model = create_model(
            spec["name"],
            num_classes=len(meta.class_names),
            pretrained=False,
            weights=None,
            **spec["kwargs"],
        )
    except (KeyError, TypeError, ValueError, IdcscopeError) as e:
        raise CheckpointError(_unbuildable(path, e)) from e
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path}: weights do not fit model {spec['name']!r}: {e}") from e
    return model.to(device).eval(), ckpt


def _unbuildable(path, e: Exception) -> str:
    return f"{path}: the model it describes cannot be built ({type(e).__name__}: {e})"
