"""``idcscope`` commands that show a person where and why: explain, heatmap, slide, serve.

Registered on the app of :mod:`idcscope.cli`, which imports this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .cli import _fail, app, logger


@app.command()
def explain(
    checkpoint: Path,
    paths: Annotated[list[Path], typer.Argument(help="Patch files or folders.")],
    out: Annotated[Path, typer.Option(help="Folder for the panels and explanations.csv.")],
    upscale: Annotated[int, typer.Option(help="Pixel enlargement of the patches.")] = 4,
    cam: Annotated[
        str | None, typer.Option(help="gradcam|hirescam (default: the model's).")
    ] = None,
) -> None:
    """Show where the model looks: Grad-CAM and saliency panels with P(IDC), one per patch."""
    from .errors import IdcscopeError
    from .explain import explain_patches

    try:
        rows = explain_patches(checkpoint, paths, out, upscale=upscale, cam_method=cam)
    except IdcscopeError as e:
        raise _fail(e) from e
    n_bad = sum(1 for r in rows if r["error"])
    logger.info("explained %d patches in %s (%d unreadable)", len(rows) - n_bad, out, n_bad)


@app.command()
def heatmap(
    checkpoint: Path,
    patient_dir: Annotated[Path, typer.Argument(help="One patient's folder: <patient>/<0|1>/.")],
    out: Annotated[Path, typer.Option(help="Folder for the PNGs and the JSON summary.")],
    threshold: Annotated[float | None, typer.Option(help="Default: the checkpoint's.")] = None,
    tta: Annotated[bool, typer.Option(help="Average the 8 dihedral transforms.")] = False,
) -> None:
    """Map a patient's predicted IDC back onto the tissue, next to the annotated IDC."""
    from .errors import IdcscopeError
    from .heatmap import patient_heatmap

    try:
        summary = patient_heatmap(checkpoint, patient_dir, out, threshold=threshold, tta=tta)
    except IdcscopeError as e:
        raise _fail(e) from e
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}, indent=2))
    logger.info("heatmap: %s", summary["files"]["heatmap"])


@app.command()
def slide(
    checkpoint: Path,
    slide_path: Annotated[Path, typer.Argument(help="A slide: .svs, .ndpi, .mrxs, tiled .tif.")],
    out: Annotated[Path, typer.Option(help="Folder for the overlay, tile CSV and GeoJSON.")],
    slide_mpp: Annotated[
        float | None, typer.Option(help="µm per level-0 pixel, if the file lacks it.")
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="Default: the checkpoint's.")] = None,
    tta: Annotated[bool, typer.Option(help="Average the 8 dihedral transforms.")] = False,
    min_tissue: Annotated[float, typer.Option(help="Tissue fraction to score a tile.")] = 0.25,
) -> None:
    """Tile a whole slide at the model's resolution; write the IDC heatmap and GeoJSON regions."""
    from .errors import IdcscopeError
    from .slide import slide_inference

    try:
        summary = slide_inference(
            checkpoint,
            slide_path,
            out,
            slide_mpp=slide_mpp,
            threshold=threshold,
            tta=tta,
            min_tissue=min_tissue,
        )
    except IdcscopeError as e:
        raise _fail(e) from e
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}, indent=2))
    logger.info(
        "overlay: %s; regions: %s", summary["files"]["overlay"], summary["files"]["geojson"]
    )


@app.command()
def serve(
    checkpoint: Path,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload (one request).")] = 2048,
    keep_jobs: Annotated[int, typer.Option(help="Finished analyses kept for download.")] = 20,
) -> None:
    """A local web app: upload patches, a patient's zip or a slide; see P(IDC), Grad-CAM, heatmaps."""
    import uvicorn

    from .errors import IdcscopeError
    from .serve import Settings, create_app

    try:
        web = create_app(checkpoint, Settings(max_upload_mb=max_upload_mb, keep_jobs=keep_jobs))
    except IdcscopeError as e:
        raise _fail(e) from e
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("no authentication: anyone who reaches %s:%d can upload files", host, port)
    logger.info("open http://%s:%d (research use only: not a medical device)", host, port)
    uvicorn.run(web, host=host, port=port, log_level="info")
