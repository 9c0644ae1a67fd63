"""Show where a patch classifier looks: Grad-CAM, gradient saliency and per-patch panels.

Grad-CAM (Selvaraju et al. 2017) weights the activations of a convolutional layer by the
spatial mean of the target logit's gradient and keeps the positive part. HiResCAM (Draelos
and Carin 2020) multiplies activations and gradients position by position instead; it is
faithful to heads that flatten the feature map into a dense layer (CancerNet), where the
averaged Grad-CAM weights often cancel to an all-zero map on confident IDC patches. Saliency
(Simonyan et al. 2014) is the largest absolute input gradient over the colour channels.
Both are computed in fp32 with the model in eval mode, and both leave the model exactly as
they found it: hooks removed, every module's training flag restored, no ``.grad`` written
to the parameters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure

from .data.manifest import IMAGE_SUFFIXES, parse_patch_name
from .errors import IdcscopeError

logger = logging.getLogger(__name__)

CAM_METHODS = ("gradcam", "hirescam")
_CAM_NAMES = {"gradcam": "Grad-CAM", "hirescam": "HiResCAM"}
CSV_COLUMNS = ["path", "prob_idc", "pred", "label", "output", "error"]


def _modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    # Module by module, not model.train(flag): a frozen backbone may be in eval mode inside a
    # model in training mode, and that mix must survive.
    for module, training in modes.items():
        module.training = training


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Scale each non-negative map of (B, H, W) to a maximum of 1; all-zero maps stay zero."""
    maps = torch.nan_to_num(maps.float(), nan=0.0).clamp_min(0)
    peak = maps.flatten(1).amax(1).view(-1, 1, 1)
    return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), 0.0)


def _no_autocast(x: torch.Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


class GradCAM:
    """Grad-CAM on one layer, as a context manager that owns its hook.

    Example::

        with GradCAM(model, method=cam_method) as cam:
            maps = cam(x, target=1)  # (B, H, W) in [0, 1]

    Args:
        model: A classifier returning logits.
        layer: Dotted module name (as in ``model.named_modules()``); defaults to
            ``model.cam_layer``, the last convolutional stage.
        method: "gradcam" (channel weights: the spatial mean of the gradient) or "hirescam"
            (the gradient itself, position by position).

    The forward hook swaps the layer's output for a detached copy that requires grad, and the
    gradient is taken with ``torch.autograd.grad`` with respect to that copy only. So a frozen
    backbone still yields gradients at the layer without touching any ``requires_grad``
    flag, nothing is back-propagated through the layers below it, and no parameter ``.grad``
    is written.
    """

    def __init__(self, model: nn.Module, layer: str | None = None, method: str | None = None):
        # A model may name the method that suits its head (cancernet: hirescam).
        method = method or getattr(model, "cam_method", "gradcam")
        if method not in CAM_METHODS:
            raise IdcscopeError(f"unknown CAM method {method!r}; choose {' or '.join(CAM_METHODS)}")
        self.model, self.method = model, method
        self.layer = layer or getattr(model, "cam_layer", None)
        if not self.layer:
            raise IdcscopeError(f"{type(model).__name__} has no cam_layer; pass layer=")
        self.module = dict(model.named_modules()).get(self.layer)
        if self.module is None:
            raise IdcscopeError(f"{type(model).__name__} has no layer {self.layer!r}")
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._modes: dict[nn.Module, bool] = {}
        self._activation: torch.Tensor | None = None
        self._active = self._recording = False

    def __enter__(self) -> GradCAM:
        self._modes = _modes(self.model)
        self.model.eval()  # dropout off, BatchNorm on running statistics: per-sample maps
        self._handles.append(self.module.register_forward_hook(self._capture))
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        _restore_modes(self._modes)
        self._activation, self._active = None, False

    def _capture(self, module: nn.Module, inputs, output):
        if not self._recording:  # other forward passes inside the with block run untouched
            return None
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise IdcscopeError(f"layer {self.layer!r} must output a (B, C, H, W) tensor")
        self._activation = output.detach().requires_grad_(True)
        # A clone, so that an in-place op after the layer never modifies the leaf itself.
        return self._activation.clone()

    def __call__(self, x: torch.Tensor, target: int = 1) -> torch.Tensor:
        """Grad-CAM maps (B, H, W) in [0, 1] at the input's size, for logit ``target``."""
        if not self._active:
            raise RuntimeError(
                "use GradCAM as a context manager: `with GradCAM(model, method=cam_method) as cam:`"
            )
        self._recording = True
        try:
            with torch.enable_grad(), _no_autocast(x):
                logits = self.model(x.float())
                self._recording = False
                act = self._activation
                if act is None:
                    raise IdcscopeError(f"layer {self.layer!r} did not run in the forward pass")
                # Samples do not interact in eval mode, so one backward gives every sample's
                # own gradient.
                (grad,) = torch.autograd.grad(logits[:, target].sum(), act)
        finally:
            self._activation, self._recording = None, False
        weights = grad.mean((2, 3), keepdim=True) if self.method == "gradcam" else grad
        cam = F.relu((weights * act.detach()).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return _normalise(cam[:, 0])


def saliency(model: nn.Module, x: torch.Tensor, target: int = 1) -> torch.Tensor:
    """Vanilla gradient saliency: max |d logit / d input| over the patch's RGB channels,
    (B, H, W) in [0, 1]."""
    modes = _modes(model)
    model.eval()
    try:
        with torch.enable_grad(), _no_autocast(x):
            xg = x.detach().float().requires_grad_(True)
            (grad,) = torch.autograd.grad(model(xg)[:, target].sum(), xg)
    finally:
        _restore_modes(modes)
    return _normalise(grad[:, :3].abs().amax(1))  # the patch's channels, not its neighbours'


def overlay(
    patch: np.ndarray, heat: np.ndarray | torch.Tensor, alpha: float = 0.45, cmap: str = "jet"
) -> np.ndarray:
    """Blend a colour-mapped heat map (H, W) in [0, 1] onto a uint8 (H, W, 3) patch."""
    from matplotlib import colormaps

    heat = heat.detach().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat)
    if heat.shape != patch.shape[:2]:
        raise ValueError(f"heat map {heat.shape} does not match patch {patch.shape[:2]}")
    colour = colormaps[cmap](np.clip(np.nan_to_num(heat), 0, 1))[..., :3] * 255.0
    out = (1 - alpha) * patch.astype(np.float32) + alpha * colour
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def explain_figure(
    patch: np.ndarray,
    cam: np.ndarray,
    sal: np.ndarray,
    title: str,
    upscale: int = 4,
    cam_name: str = "Grad-CAM",
) -> Figure:
    """Three panels (patch, CAM overlay, saliency overlay), pixels enlarged ``upscale``x.

    An all-zero map is shown as the bare patch and says so: a uniformly blue overlay would
    read as "looked everywhere equally" when it means "found no positive evidence".
    """
    panels = {"patch": patch}
    for name, heat in ((cam_name, cam), ("saliency", sal)):
        empty = not np.nanmax(heat) > 0
        panels[f"{name}: none positive" if empty else name] = (
            patch if empty else overlay(patch, heat)
        )
    k = max(1, int(upscale))
    dpi = 100
    side = patch.shape[1] * k / dpi
    fig = Figure(figsize=(3 * side + 0.4, side + 0.75), dpi=dpi, layout="constrained")
    for ax, (name, img) in zip(fig.subplots(1, 3), panels.items(), strict=True):
        ax.imshow(img.repeat(k, 0).repeat(k, 1), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    return fig


def _expand(paths: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(p)  # missing files get their error row when decoded
    return files


def _output_name(stem: str, used: set[str]) -> str:
    name, k = f"{stem}_explain.png", 2
    while name in used:  # the same file name in two folders
        name, k = f"{stem}_{k}_explain.png", k + 1
    used.add(name)
    return name


@dataclass
class Explanations:
    """What the model says about a batch of patches, and where it looks."""

    prob: np.ndarray  # calibrated P(IDC), (N,)
    cam: np.ndarray  # CAM maps (N, H, W) in [0, 1]
    saliency: np.ndarray  # saliency maps (N, H, W) in [0, 1]
    method: str  # "gradcam" or "hirescam"

    @property
    def cam_name(self) -> str:
        return _CAM_NAMES[self.method]


def explain_images(
    model: nn.Module,
    ckpt: dict,
    images: np.ndarray,
    batch_size: int = 64,
    cam_method: str | None = None,
    patients: np.ndarray | None = None,
    coords: tuple[np.ndarray, np.ndarray] | None = None,
) -> Explanations:
    """Calibrated P(IDC), CAM and saliency maps of uint8 patches, with a model already loaded.

    Args:
        model: The checkpoint's model (see :func:`idcscope.checkpoint.load_model`).
        ckpt: The checkpoint dict: preprocessing, temperature, class names.
        images: uint8 patches (N, H, W, 3).
        batch_size: Patches per forward/backward pass.
        cam_method: "gradcam" or "hirescam" (see :class:`GradCAM`); None: the model's choice.
        patients: One id per patch, for models that normalise the stain per patient.
        coords: ``(xs, ys)`` per patch, for models that see each patch's neighbours;
            without them every patch is seen alone.
    """
    from .engine import Preprocessing, to_float

    prep = Preprocessing(**ckpt["preprocessing"])
    names = list(ckpt.get("class_names", ["no_idc", "idc"]))
    target = names.index("idc") if "idc" in names else 1
    temperature = float(ckpt.get("temperature", 1.0))
    images, _ = prep.model_input(np.asarray(images), None, patients, coords)
    probs, cams, sals = [], [], []
    with GradCAM(model, method=cam_method) as cam:
        for s in range(0, len(images), batch_size):
            x = prep(to_float(images[s : s + batch_size]))
            with torch.no_grad(), _no_autocast(x):
                logits = model(x.float()) / temperature
                probs.append(F.softmax(logits, 1)[:, target].numpy())
            cams.append(cam(x, target).numpy())
            sals.append(saliency(model, x, target).numpy())
        method = cam.method
    size = images.shape[1:3]
    return Explanations(
        prob=np.concatenate(probs) if probs else np.zeros(0, np.float32),
        cam=np.concatenate(cams) if cams else np.zeros((0, *size), np.float32),
        saliency=np.concatenate(sals) if sals else np.zeros((0, *size), np.float32),
        method=method,
    )


def explain_patches(
    checkpoint: str | Path,
    paths: list[str | Path],
    out_dir: str | Path,
    upscale: int = 4,
    batch_size: int = 64,
    cam_method: str | None = None,
) -> list[dict]:
    """Explain the model's call on each patch: P(IDC), Grad-CAM and saliency, as PNG panels.

    Args:
        checkpoint: An idcscope checkpoint.
        paths: Patch files, or folders searched recursively for images.
        out_dir: Receives ``<stem>_explain.png`` per patch and ``explanations.csv``.
        upscale: Pixel enlargement of the 50 px patches in the panels.
        batch_size: Patches per forward/backward pass.
        cam_method: "gradcam" or "hirescam" (see :class:`GradCAM`); None: the model's choice.

    Returns:
        One dict per input file, as in ``explanations.csv``: path, prob_idc, pred (0/1),
        label (from the file name; None when unknown), output (the panel's file name) and
        error (why the file was skipped; "" when it was not).
    """
    from .checkpoint import load_model
    from .data.cache import decode_patch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, ckpt = load_model(checkpoint)
    threshold = float(ckpt.get("threshold", 0.5))

    rows, images, patients, places = [], [], [], []
    for f in _expand(paths):
        meta = parse_patch_name(f.name) or {}
        row = {
            "path": str(f),
            "prob_idc": None,
            "pred": None,
            "label": meta.get("label"),
            "output": "",
            "error": "",
        }
        try:
            images.append(decode_patch(f)[0])
            patients.append(meta.get("patient", f.stem))
            places.append((meta.get("x", np.nan), meta.get("y", np.nan)))
        except Exception as e:  # any unreadable file is reported in its row, never fatal
            row["error"] = f"{type(e).__name__}: {e}"
            logger.warning("skipped %s: %s", f, row["error"])
        rows.append(row)
    good = [r for r in rows if not r["error"]]
    batch = np.stack(images) if images else np.zeros((0, 50, 50, 3), np.uint8)
    coords = tuple(np.asarray(places, dtype=np.float64).reshape(-1, 2).T)
    ex = explain_images(model, ckpt, batch, batch_size, cam_method, np.asarray(patients), coords)
    used: set[str] = set()
    for i, row in enumerate(good):
        p = float(ex.prob[i])
        row.update(prob_idc=round(p, 6), pred=int(p >= threshold))
        row["output"] = _output_name(Path(row["path"]).stem, used)
        title = _title(row, threshold)
        fig = explain_figure(batch[i], ex.cam[i], ex.saliency[i], title, upscale, ex.cam_name)
        fig.savefig(out / row["output"])
    pd.DataFrame(rows, columns=CSV_COLUMNS).astype({"pred": "Int64", "label": "Int64"}).to_csv(
        out / "explanations.csv", index=False
    )
    logger.info("explained %d of %d patches in %s", len(good), len(rows), out)
    return rows


def _title(row: dict, threshold: float) -> str:
    said = "IDC" if row["pred"] else "no IDC"
    text = f"{Path(row['path']).name}\nP(IDC) = {row['prob_idc']:.3f}: {said}"
    text += f" (threshold {threshold:.2f})"
    if row["label"] is not None:
        text += f", label {'IDC' if row['label'] else 'no IDC'}"
    return text
