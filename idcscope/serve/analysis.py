"""The server's analyses: blocking functions run in a worker thread, one at a time.

Each takes a job (the request's folder) and returns the JSON the page shows, with download
URLs for the files it published. Bad files are reported in their own row, never raised.
Each says what the model calls every patch (IDC, no IDC, or uncertain where the model's
measured error in the patch's context is too high, or its input check flags the patch),
and warns when the patients uploaded are ones the model trained or validated on.

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
from .drawing import write_blocks, write_maps
from .jobs import Job
from .uploads import Upload, UploadError, check_pixels, extract_patient_zip

logger = logging.getLogger(__name__)

SEEN = "used to train or validate the model"  # as ``evaluate`` warns


def slides_supported() -> bool:
    """Whether whole-slide analysis can run here: openslide (a dependency) imports."""
    return importlib.util.find_spec("openslide") is not None


class Analyst:
    """The model, loaded once, and the analyses that use it, serialised by ``lock``.

    Args:
        checkpoint: An idcscope checkpoint.
        device: Where the model runs.
        alpha: The uncertain band its calls are made with (``Predictor``).
    """

    def __init__(self, checkpoint: str | Path, device: str = "cpu", alpha: float | None = None):
        from ..inference.explain import Explainer

        self.predictor = Predictor(checkpoint, device=device, alpha=alpha)
        self.explainer = Explainer(self.predictor)
        self.meta = self.predictor.models[0]
        contexts = self.meta.contexts
        bands = [c["band"] for c in contexts] if alpha is None else self.meta.bands(alpha)
        self.contexts = [_context(c, b) for c, b in zip(contexts, bands, strict=True)]
        self.lock = threading.Lock()
        # The Explainer's model takes one map at a time (its hooks); inspecting a tile of a
        # slide takes only this lock, so a click is answered while the slide is scored.
        self.explaining = threading.Lock()

    def describe(self) -> dict:
        """What the page shows about the model: how it decides each patch, by the context
        the patch is scored in (``contexts``: none for a model without measured contexts,
        which decides every patch at its threshold)."""
        return {
            "checkpoint": self.predictor.paths[0].name,
            "model": self.meta.model["name"],
            "threshold": round(self.predictor.threshold, 4),
            "contexts": self.contexts,
            # Patient zips and slides are scored with their neighbours; lone patches alone.
            "context_sigma": self.predictor.context_sigma,
            "mpp": self.meta.preprocessing.get("mpp"),
        }

    def context_of(self, neighbours: int | None) -> dict:
        """The context a patch was scored in (``neighbours``: how many of its 8 were
        there, None when alone) and the model's measured AUC there; None without one."""
        i = self.meta.context_index([np.nan if neighbours is None else neighbours])[0]
        if i < 0:
            return {"context": None, "context_auc": None}
        c = self.contexts[i]
        return {"context": c["name"], "context_auc": c["auc"]}

    def seen(self, patients) -> list[str]:
        """The warning that some of ``patients`` trained or validated the model: their
        numbers are optimistic (``evaluation.evaluate`` warns alike)."""
        seen = sorted(self.predictor.seen_patients & {str(p) for p in patients})
        if not seen:
            return []
        if len(seen) == 1:
            return [f"patient {seen[0]} was {SEEN}; its numbers are optimistic"]
        return [f"patients {', '.join(seen)} were {SEEN}; their numbers are optimistic"]

    # ------------------------------------------------------------------------- patches

    def patches(self, job: Job, uploads: list[Upload], max_pixels: int) -> dict:
        """P(IDC), call, label and explanation of each uploaded patch.

        Scored as ``predict`` scores files of these names: patches whose names carry one
        patient and their places are seen together, a lone patch alone. A patch model's
        explanation is its CAM and saliency; a neighbourhood model's, the block it saw
        and the attribution over it (``drawing``).

        Raises:
            UploadError: 413 when the images hold more than ``max_pixels`` in all.
        """
        sent = [i for i, u in enumerate(uploads) if not u.error]
        table = files_table([uploads[i].path for i in sent], [uploads[i].name for i in sent])
        threshold = self.predictor.threshold
        with self.lock:
            check_pixels(uploads, max_pixels)
            with self.explaining:
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
            rows[i] |= self.context_of(rows[i]["neighbours"]) | _explanation(job, k, ex)
        return {
            "kind": "patches",
            "threshold": threshold,
            "explanation": "cam" if ex.blocks is None else "block",
            "cam": ex.cam_name,
            "n_files": len(rows),
            "n_predicted": int(ex.ok.sum()),
            "calls": ex.verdicts.counts()["calls"],
            "warnings": self.seen(table["patient"]),
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
            "warnings": self.seen([unpacked.patient]),
            "skipped": unpacked.skipped + unreadable,
            "files": {
                "heatmap": job.publish(files["heatmap"]),
                "probability": job.publish(files["probability"]),
                "csv": job.publish(files["predictions"]),
                "json": job.publish(files["json"]),
            },
        }

    def patient_slide(
        self, job: Job, archive: Path, max_members: int, max_bytes: int, max_pixels: int
    ):
        """The one patient of a zip rebuilt into a pyramidal TIFF in the job's folder (at
        the patches' resolution, the model's), opened for the viewer (a ``ZoomedSlide``)."""
        from ..spatial.heatmap import patient_slide
        from .viewer import ZoomedSlide

        with self.lock:
            where = job.scratch / "patient"
            unpacked = extract_patient_zip(archive, where, max_members, max_bytes, max_pixels)
            name = f"{unpacked.patient}.tif"
            mpp = float(self.meta.preprocessing["mpp"])
            try:
                path = patient_slide(unpacked.folder, job.folder / name, mpp)
            except IdcscopeError as e:
                raise _renamed(e, unpacked.folder, f"patient {unpacked.patient}") from e
        return ZoomedSlide(path, name)

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
                files = summary.pop("files", {})
            except IdcscopeError as e:
                raise _renamed(e, path, name) from e
        summary["slide"] = name
        return {
            "kind": "slide",
            "summary": summary,
            "warnings": self.seen([Path(name).stem]),  # a slide is named for its patient
            "files": {k: job.publish(p) for k, p in files.items() if p and Path(p).is_file()},
        }


def _context(c: dict, band: list) -> dict:
    """What the page shows of one scoring context of a model (``ModelMeta.contexts``): its
    name, neighbour range, the uncertain band in use and measured AUC and coverage (None:
    not measured; coverage is measured at the model's own band only)."""
    lo, hi = c["neighbours"]
    name = c.get("name") or f"{lo}-{hi} neighbours"
    own = band == c.get("band")
    return {
        "name": name,
        "neighbours": [int(lo), int(hi)],
        "band": [_number(b) for b in band],
        "auc": _number(c.get("measured", {}).get("auc")),  # out of fold (training.oof)
        "coverage": _number(c.get("measured", {}).get("coverage")) if own else None,
    }


def _number(x, digits: int = 4) -> float | None:
    """``x`` rounded for the page; None where it is absent or not a finite number."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return round(x, digits) if np.isfinite(x) else None


def _explanation(job: Job, k: int, ex, stem: str = "") -> dict:
    """The images that explain patch ``k`` of ``ex`` (an ``Explanations``): its CAM and
    saliency, or, for a neighbourhood model, its block and the evidence of each plane
    group in logits (files named ``<stem>_<kind>.png``; ``stem``: ``k``'s number)."""
    if ex.blocks is None:
        images = write_maps(job, k, ex.patches[k], ex.cam[k], ex.saliency[k], stem)
        return {"images": images, "cam_empty": not ex.cam[k].max() > 0}  # none positive
    groups = ex.attribution[k]
    evidence = {"patch": float(groups[0].sum()), "neighbourhood": float(groups[1].sum())}
    return {"images": write_blocks(job, k, ex.blocks[k], groups, stem), "evidence": evidence}


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
