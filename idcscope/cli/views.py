"""``idcscope`` commands that show a person where and why: explain, heatmap, slide, serve.

Registered on ``cli.app.app`` when the ``cli`` package is imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from .app import (
    EXIT_CODES_HELP,
    CallAlpha,
    Context,
    Engine,
    Inputs,
    Model,
    Tta,
    app,
    fail,
    logger,
    model_path,
    out_folder,
    scored_exit,
)


@app.command(epilog=EXIT_CODES_HELP)
def explain(
    paths: Inputs,
    out: Annotated[Path, typer.Option(help="Folder for the panels and explanations.csv.")],
    upscale: Annotated[int, typer.Option(help="Pixel enlargement of the patches.")] = 4,
    cam: Annotated[
        str | None, typer.Option(help="gradcam|hirescam (default: the model's).")
    ] = None,
    engine: Engine = "auto",
    alpha: CallAlpha = None,
    model: Model = None,
) -> None:
    """Show where the model looks: Grad-CAM and saliency panels with P(IDC), one per patch.

    P(IDC) is what ``predict`` gives the same files; the maps are computed on the input
    the model scored. A model that sees the neighbourhood gets the patch's 3x3 block
    instead, with the evidence of its neighbourhood planes over the block and of its patch
    planes over the patch (Integrated Gradients from glass; pass the patient's folder so
    the neighbours are there).
    """
    out_folder(out)
    from ..inference.explain import explain_patches
    from ..inference.predictor import Predictor

    predictor = Predictor(model_path(model), engine, alpha=alpha)
    rows = explain_patches(predictor, paths, out, upscale=upscale, cam_method=cam)
    n_bad = sum(1 for r in rows if r["error"])
    logger.info("explained %d patches in %s (%d unreadable)", len(rows) - n_bad, out, n_bad)
    scored_exit(len(rows) - n_bad, n_bad, out / "explanations.csv")


@app.command(epilog=EXIT_CODES_HELP)
def heatmap(
    patient_dir: Annotated[
        Path, typer.Argument(exists=True, help="One patient's folder: <patient>/<0|1>/.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the PNGs and the JSON summary.")],
    threshold: Annotated[float | None, typer.Option(help="Default: the checkpoint's.")] = None,
    tta: Tta = False,
    context: Context = True,
    engine: Engine = "auto",
    alpha: CallAlpha = None,
    model: Model = None,
) -> None:
    """Map a patient's predicted IDC back onto the tissue, next to the annotated IDC."""
    out_folder(out)
    from ..inference.predictor import Predictor
    from ..spatial.heatmap import patient_heatmap

    predictor = Predictor(model_path(model), engine, tta=tta, context=context, alpha=alpha)
    summary = patient_heatmap(predictor, patient_dir, out, threshold=threshold)
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}, indent=2))
    logger.info("heatmap: %s", summary["files"]["heatmap"])
    n_bad = summary["n_unreadable"] + summary["n_skipped"]
    scored_exit(summary["n_patches"], n_bad, summary["files"]["skipped"])


@app.command()
def slide(
    slide_paths: Annotated[
        list[Path], typer.Argument(exists=True, help="Slides: .svs, .ndpi, .mrxs, tiled .tif, ...")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the overlays, tile CSVs and GeoJSON.")],
    slide_mpp: Annotated[
        float | None, typer.Option(help="µm per level-0 pixel, if the files lack it.")
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="Default: the checkpoint's.")] = None,
    tta: Tta = False,
    min_tissue: Annotated[float, typer.Option(help="Tissue fraction to score a tile.")] = 0.25,
    context: Context = True,
    engine: Engine = "auto",
    alpha: CallAlpha = None,
    model: Model = None,
) -> None:
    """Tile whole slides at the model's resolution; write IDC heatmaps and GeoJSON regions.

    One row per slide goes to OUT/slides.csv. Under torchrun the slides are shared out
    between the processes.

    Exit codes: 0 every slide scored; 1 error (a slide that cannot be read stops the run,
    the message names it); 2 wrong command line.
    """
    out_folder(out)
    from ..spatial.slide import slides_inference

    summaries = slides_inference(
        model_path(model),
        slide_paths,
        out,
        slide_mpp=slide_mpp,
        threshold=threshold,
        tta=tta,
        min_tissue=min_tissue,
        context=context,
        engine=engine,
        alpha=alpha,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        for summary in summaries:
            print(json.dumps({k: v for k, v in summary.items() if k != "files"}, indent=2))
        logger.info("overlays, tiles and regions in %s; one row per slide in slides.csv", out)


@app.command()
def serve(
    model: Model = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload (one request).")] = 2048,
    keep_jobs: Annotated[int, typer.Option(help="Finished analyses kept for download.")] = 20,
    slides: Annotated[
        Path | None,
        typer.Option(
            exists=True, file_okay=False, help="A folder of slides to view, where they lie."
        ),
    ] = None,
    alpha: CallAlpha = None,
) -> None:
    """A local web app: upload patches, a patient's zip or a slide; see P(IDC), Grad-CAM, heatmaps.

    With --slides DIR, the page's viewer lists the slides in DIR (any format OpenSlide
    reads) and shows them zoomable with the model's P(IDC) over them; no file outside DIR
    is ever served.

    It answers only requests addressed to HOST or loopback names, and uploads from its own
    page (or from clients that are not browsers, such as curl).
    """
    import uvicorn

    from ..errors import IdcscopeError
    from ..serve import Settings, create_app

    settings = Settings(
        max_upload_mb=max_upload_mb,
        keep_jobs=keep_jobs,
        host=host,
        slides=None if slides is None else str(slides),
        alpha=alpha,
    )
    try:
        web = create_app(model_path(model), settings)
    except IdcscopeError as e:
        raise fail(e) from e
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("no authentication: anyone who reaches %s:%d can upload files", host, port)
    logger.info("open http://%s:%d (research use only: not a medical device)", host, port)
    # No proxy in front: X-Forwarded-* headers are a client's word, not the connection's.
    uvicorn.run(web, host=host, port=port, log_level="info", proxy_headers=False)
