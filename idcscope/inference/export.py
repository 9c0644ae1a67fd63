"""Export a checkpoint: an ONNX graph (the one ONNX Runtime scores, ``inference.onnx``) or
a model folder (``models.bundle``), each carrying every field of ``models.schema``.

The exported graph takes ``patches``, float32 of shape (B, C, H, W) with values in [0, 1]
(the model input of ``data.preprocess`` divided by 255: C = 3, the RGB patch, or 6, the
patch then the block of its neighbours), and returns ``logits`` (B, 2). Normalisation is
folded into the graph, so a consumer needs no idcscope code; the class names, decision
threshold, temperature, spatial context and preprocessing travel in the file's
``metadata_props``, each value JSON-encoded, so the ``.onnx`` file describes itself as the
checkpoint does, and ``weights_sha256`` names the weights it was exported from.

Export uses torch's ``torch.export``-based exporter (the default since torch 2.9; it needs
``onnxscript``), which writes opset 18 or newer; one self-contained file, no external data.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import IdcscopeError
from ..models.bundle import CARD, CONFIG, MANIFEST, WEIGHTS, sha256_of
from ..models.card import fill_card
from ..models.checkpoint import load_model, read_checkpoint, read_meta, weights_sha256
from ..models.schema import plain
from .onnx import OnnxModel

logger = logging.getLogger(__name__)

MIN_OPSET = 18  # the torch.export-based exporter writes no older opset
INPUT_CONTRACT = "float32 (B, 3, H, W) RGB in [0, 1]; normalisation is inside the graph"
NEIGHBOURHOOD_CONTRACT = (
    "float32 (B, 6, H, W) in [0, 1]: the RGB patch, then the RGB block of its neighbours "
    "averaged down to (H, W) (idcscope.data.neighbourhood); normalisation is inside the graph"
)


class _Normalised(nn.Module):
    """The model behind its normalisation, so the graph takes images in [0, 1]."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.model((patches - self.mean) / self.std)


def export_onnx(
    checkpoint: str | Path,
    out_path: str | Path | None = None,
    opset: int = MIN_OPSET,
    batch_size: int | None = None,
) -> Path:
    """Write the checkpoint's model, normalisation included, as a single ONNX file.

    Args:
        checkpoint: an idcscope checkpoint (``.pt``).
        out_path: where to write; defaults to the checkpoint's path with suffix ``.onnx``.
        opset: ONNX opset version, 18 or newer.
        batch_size: a fixed batch size; None exports a dynamic batch dimension.

    Returns:
        The path written (atomically: a temporary file, then a rename). The graph is
        checked with ``onnx.checker`` and its logits are compared with the torch model's
        on a random batch before returning.
    """
    import onnx

    if opset < MIN_OPSET:
        raise IdcscopeError(f"opset {opset} is too old: the exporter writes {MIN_OPSET} or newer")
    checkpoint = Path(checkpoint)
    out = Path(out_path) if out_path else checkpoint.with_suffix(".onnx")
    model, ckpt = load_model(checkpoint)
    prep = ckpt["preprocessing"]
    wrapped = _Normalised(model, prep["mean"], prep["std"]).eval()
    size = int(prep.get("patch_size", 50))
    # torch.export specialises sizes 0 and 1, so the example batch for a dynamic one is 2.
    # Three channels, or six for a model that sees each patch's neighbourhood too.
    shape = (batch_size or 2, len(prep["mean"]), size, size)
    example = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    dynamic = None if batch_size else {"patches": {0: torch.export.Dim("batch")}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings():
            # torch.export's internals warn about their own deprecations; nothing to act on.
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            torch.onnx.export(
                wrapped,
                (example,),
                tmp,
                dynamo=True,
                verbose=False,
                input_names=["patches"],
                output_names=["logits"],
                opset_version=opset,
                dynamic_shapes=dynamic,
                external_data=False,
            )
        proto = onnx.load(tmp)
        contract = NEIGHBOURHOOD_CONTRACT if prep.get("neighbourhood") else INPUT_CONTRACT
        meta = {**published(checkpoint), "input": contract, "source": checkpoint.name}
        meta["weights_sha256"] = weights_sha256(checkpoint)
        onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in meta.items()})
        proto.doc_string = f"idcscope {ckpt['model']['name']}: P(IDC) logits of 50x50 H&E patches"
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, tmp)
        _check_agreement(wrapped, OnnxModel(tmp), example, out)
        tmp.replace(out)
    except OSError as e:  # a full disk or a file-size limit: say which file, in one line
        raise IdcscopeError(f"{out}: write failed ({e.strerror or e})") from e
    finally:
        tmp.unlink(missing_ok=True)
    logger.info(
        "exported %s to %s (opset %d, batch %s)", checkpoint, out, opset, batch_size or "dynamic"
    )
    return out


def _check_agreement(torch_model: nn.Module, runner: OnnxModel, x: torch.Tensor, path) -> None:
    with torch.no_grad():
        expected = torch_model(x).numpy()
    got = runner.logits(x.numpy())
    if not np.allclose(got, expected, atol=1e-3, rtol=1e-3):
        diff = np.abs(got - expected).max()
        raise IdcscopeError(f"{path}: ONNX Runtime and torch disagree (max |diff| {diff:.2e})")


def save_bundle(checkpoint: str | Path, out_dir: str | Path, card: str | None = None) -> Path:
    """Write the bundle of a checkpoint into ``out_dir``; returns the folder.

    ``card`` is the model card's markdown (a stub naming the model when None), its
    markers filled with the model's measured numbers (``models.card``).
    """
    from safetensors.torch import save_file

    ckpt = read_checkpoint(checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in ckpt["state_dict"].items()}
    config = published(checkpoint)
    save_file(weights, str(out / WEIGHTS), metadata={"format": config["format"]})
    (out / WEIGHTS).chmod(0o644)  # safetensors writes 0600: others must read an install
    name = ckpt["model"]["name"]
    text = fill_card(card, read_meta(checkpoint)) if card is not None else None
    (out / CARD).write_text(text if text is not None else f"# idcscope model ({name})\n")
    digests = {f: sha256_of(out / f) for f in (WEIGHTS, CARD)}
    config["weights_sha256"] = digests[WEIGHTS]  # as the card states it
    config[MANIFEST] = digests
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    return out


def published(checkpoint: str | Path) -> dict:
    """Every field of a checkpoint's ``ModelMeta`` as JSON values, as both exports write
    them; where the run was written and cached is the training machine's business."""
    fields = plain(read_meta(checkpoint).to_fields())
    for local in ("out", "cache_dir"):
        fields["config"].pop(local, None)
    return fields
