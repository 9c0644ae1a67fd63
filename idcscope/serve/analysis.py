"""The server's analyses: blocking functions run in a worker thread, one at a time.

Each takes a job (the request's folder) and returns the JSON the page shows, with download
URLs for the files it published. Bad files are reported in their own row, never raised.

All the heavy work of a request (unpacking a zip, reading image headers for the pixel
budget, decoding, the model) runs under ``Analyst.lock``, so requests queue rather than
share the CPU. Errors name files as the client sent them, never by their server path.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.manifest import files_table
from ..errors import IdcscopeError
from ..inference.predictor import Predictor
from ..inference.tables import PATCH_IDS, Verdicts, prediction_table
from .jobs import Job
from .uploads import Upload, UploadError, check_pixels, extract_patient_zip

logger = logging.getLogger(__name__)

UPSCALE = 4  # 50 px patches shown at 200 px, pixels kept sharp


def slides_supported() -> bool:
    """Whether whole-slide analysis can run here: openslide (a dependency) imports."""
    return importlib.util.find_spec("openslide") is not None


class Analyst:
    """The model, loaded once, and the analyses that use it, serialised by ``lock``.

    Args:
        checkpoint: An idcscope checkpoint.
        device: Where the model runs.
    """

    def __init__(self, checkpoint: str | Path, device: str = "cpu"):
        from ..inference.explain import Explainer

        self.predictor = Predictor(checkpoint, device=device)
        self.explainer = Explainer(self.predictor)
        self.meta = self.predictor.models[0]
        self.lock = threading.Lock()

    def describe(self) -> dict:
        """What the page shows about the model."""
        (t, b), (lone_t, lone_b) = self.meta.calibrated(), self.meta.calibrated(lone=True)
        return {
            "checkpoint": self.predictor.paths[0].name,
            "model": self.meta.model["name"],
            "threshold": round(self.predictor.threshold, 4),
            "temperature": round(t, 4),
            "logit_bias": round(b, 4),
            "lone_temperature": round(lone_t, 4),
            "lone_logit_bias": round(lone_b, 4),
            # Patient zips and slides are scored with their neighbours; lone patches alone.
            "context_sigma": self.predictor.context_sigma,
            "mpp": self.meta.preprocessing.get("mpp"),
        }

    # ------------------------------------------------------------------------- patches

    def patches(self, job: Job, uploads: list[Upload], max_pixels: int) -> dict:
        """P(IDC), prediction, label, Grad-CAM and saliency for each uploaded patch.

        Scored as ``predict`` scores files of these names: patches whose names carry one
        patient and their places are seen together, a lone patch alone.

        Raises:
            UploadError: 413 when the images hold more than ``max_pixels`` in all.
        """
        sent = [i for i, u in enumerate(uploads) if not u.error]
        table = files_table([uploads[i].path for i in sent], [uploads[i].name for i in sent])
        threshold = self.predictor.threshold
        with self.lock:
            check_pixels(uploads, max_pixels)
            ex = self.explainer.explain(table)
        errors = [u.error for u in uploads]
        for i, reason in zip(sent, ex.reasons, strict=True):
            if reason:
                errors[i] = f"not a readable image: {_named(reason, uploads[i])}"
        scored = np.asarray(sent, dtype=np.int64)[ex.ok]  # the uploads read, in ex's order
        verdicts = Verdicts.empty(len(uploads))
        verdicts.put(scored, ex.verdicts)
        predictions = _patch_table(uploads, verdicts, threshold, errors)
        csv = job.folder / "predictions.csv"
        predictions.to_csv(csv, index=False)
        rows = predictions.astype(object).where(predictions.notna(), None).to_dict("records")
        for row in rows:
            row["images"] = {}
        for k, i in enumerate(scored):
            rows[i]["images"] = _write_maps(job, k, ex.patches[k], ex.cam[k], ex.saliency[k])
            rows[i]["cam_empty"] = not ex.cam[k].max() > 0  # no positive evidence: bare patch
        return {
            "kind": "patches",
            "threshold": threshold,
            "cam": ex.cam_name,
            "n_files": len(rows),
            "n_predicted": int(ex.ok.sum()),
            "rows": rows,
            "files": {"csv": job.publish(csv)},
        }

    # ------------------------------------------------------------------------- patient

    def patient(
        self, job: Job, archive: Path, max_members: int, max_bytes: int, max_pixels: int
    ) -> dict:
        """Heatmap, summary and predictions of the one patient in a zip."""
        from ..spatial.heatmap import patient_heatmap

        with self.lock:
            where = job.scratch / "patient"
            unpacked = extract_patient_zip(archive, where, max_members, max_bytes, max_pixels)
            try:
                summary = patient_heatmap(self.predictor, unpacked.folder, job.folder / "out")
            except IdcscopeError as e:
                raise _renamed(e, unpacked.folder, f"patient {unpacked.patient}") from e
        files = summary.pop("files")
        predicted = {Path(p).name for p in pd.read_csv(files["predictions"])["path"]}
        unreadable = [
            {"file": name, "error": "not a readable image"}
            for name in unpacked.names
            if name not in predicted
        ]
        # Rewritten without the files' server paths: the summary the page shows.
        files["json"] = job.folder / "out" / f"{unpacked.patient}_heatmap.json"
        files["json"].write_text(json.dumps(summary, indent=2) + "\n")
        return {
            "kind": "patient",
            "summary": summary,
            "skipped": unpacked.skipped + unreadable,
            "files": {
                "heatmap": job.publish(files["heatmap"]),
                "probability": job.publish(files["probability"]),
                "csv": job.publish(files["predictions"]),
                "json": job.publish(files["json"]),
            },
        }

    # ------------------------------------------------------------------------- slide

    def slide(self, job: Job, path: Path, name: str, mpp: float | None = None) -> dict:
        """Tile a whole-slide image, score its tissue and map IDC (see idcscope.spatial.slide)."""
        try:
            from ..spatial.slide import slide_inference
        except ImportError as e:
            raise UploadError(501, f"whole-slide analysis is not available here: {e}") from e
        with self.lock:
            try:
                summary = slide_inference(self.predictor, path, job.folder / "out", slide_mpp=mpp)
            except IdcscopeError as e:
                raise _renamed(e, path, name) from e
        files = summary.pop("files", {})
        summary["slide"] = name
        return {
            "kind": "slide",
            "summary": summary,
            "files": {k: job.publish(p) for k, p in files.items() if p and Path(p).is_file()},
        }


def _patch_table(uploads: list[Upload], verdicts, threshold: float, errors) -> pd.DataFrame:
    """The uploads' prediction table (``inference.tables``): each file named as it was sent
    (``file``, what the page reads; never its server path), with the patient, place and
    label its name tells, read as ``predict`` reads them."""
    named = files_table([u.name for u in uploads])
    ids = named[PATCH_IDS].rename(columns={"path": "file"})
    label = named["label"].to_numpy()
    return prediction_table(ids, verdicts, threshold, label=label, error=errors)


def _renamed(e: IdcscopeError, path: Path, name: str) -> IdcscopeError:
    """``e`` again, naming ``path`` as the client knows it (``str(e)`` is all that is shown)."""
    return type(e)(str(e).replace(str(path), name))


def _named(reason: str, upload: Upload) -> str:
    # The stored path means nothing to the person who sent the file: name it as they did.
    return reason.replace(str(upload.path), upload.name)


def _write_maps(job: Job, k: int, patch: np.ndarray, cam: np.ndarray, sal: np.ndarray) -> dict:
    """The patch and its CAM and saliency overlays as enlarged PNGs; returns their URLs."""
    from PIL import Image

    from ..inference.explain import overlay

    urls = {}
    for kind, img in (
        ("patch", patch),
        ("cam", overlay(patch, cam) if cam.max() > 0 else patch),
        ("saliency", overlay(patch, sal) if sal.max() > 0 else patch),
    ):
        path = job.folder / f"{k:04d}_{kind}.png"
        size = (img.shape[1] * UPSCALE, img.shape[0] * UPSCALE)
        Image.fromarray(img).resize(size, Image.Resampling.NEAREST).save(path)
        urls[kind] = job.publish(path)
    return urls
