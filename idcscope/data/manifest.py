"""Index a patch dataset into a manifest table: one row per image, in a deterministic order.

Two layouts are understood:

* Kaggle IDC: ``<root>/[IDC_regular_ps50_idx5/]<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<C>.png``;
  the folder label and the file-name label must agree.
* Plain: ``<root>/<class>/<anything>.png`` where the patient is unknown; every file then
  becomes its own group, which makes patient-level splitting impossible (a warning says so).

What a file's name says is read by one rule, :func:`parse_name`, everywhere: in these
layouts, in the loose files ``predict`` and ``explain`` take, and in the web page's uploads.

Sizes are read from the PNG header without decoding, so indexing 277k files takes seconds.
Files whose header is not a readable image are left out and returned as ``skipped``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError

logger = logging.getLogger(__name__)

CLASS_NAMES = ("no_idc", "idc")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
KAGGLE_TOP = "IDC_regular_ps50_idx5"
COLUMNS = ["path", "patient", "x", "y", "label", "width", "height"]
SKIPPED_COLUMNS = ["path", "reason"]

# The patient id is whatever precedes the last "_idx": ids may hold underscores and any script.
# Coordinates have at most 9 ASCII digits: a longer number is no slide position, and would
# overflow the int64 manifest columns.
_NAME = re.compile(
    r"(?P<patient>[^/]+?)_idx[0-9]+_x(?P<x>[0-9]{1,9})_y(?P<y>[0-9]{1,9})_class(?P<label>[01])"
)
_CLASS_ALIASES = {
    "0": 0,
    "no_idc": 0,
    "non_idc": 0,
    "negative": 0,
    "benign": 0,
    "normal": 0,
    "1": 1,
    "idc": 1,
    "positive": 1,
    "malignant": 1,
    "cancer": 1,
    "tumor": 1,
}


@dataclass
class Index:
    """A manifest plus what could not go into it."""

    root: Path
    table: pd.DataFrame
    layout: str  # "kaggle" | "plain" | "files"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def n_patients(self) -> int:
        return int(self.table["patient"].nunique())


def parse_name(
    path: str, folder: str | None = None, check_folder: bool = False
) -> tuple[str | None, int, int, int]:
    """``(patient, x, y, label)`` as a file's name, and the class folder holding it, tell.

    The one rule, which every command and the web page follow:

    * the Kaggle name ``<patient>_idx<N>_x<X>_y<Y>_class<C>`` gives all four;
    * any other name whose stem ends ``_class0`` or ``_class1`` gives the label alone
      (``x_class1.png`` is IDC);
    * otherwise the folder holding the file, when it is a class folder (``0``, ``1``,
      ``idc``, ``benign``, ...), gives the label.

    The patient is None, and x and y are -1, where the name does not carry them (a name
    holds no place without its patient); the label is -1 where neither name nor folder
    tells. Only the name is read: the file need not exist.

    Args:
        path: the file's path, or its name alone.
        folder: the class folder's name (default: the folder ``path`` names).
        check_folder: where labels are used (training, evaluation, heatmaps), a name and a
            class folder that disagree are an error; scoring needs no label, so there the
            name's label stands.

    Raises:
        DataError: with ``check_folder``, the name and the folder say different classes.
    """
    stem = os.path.splitext(os.path.basename(path))[0]  # noqa: PTH119, PTH122
    label = int(stem[-1]) if stem.endswith(("_class0", "_class1")) else -1
    if label < 0 or check_folder:  # else the folder changes nothing: predict reads 277k names
        if folder is None:
            folder = os.path.basename(os.path.dirname(path))  # noqa: PTH119, PTH120
        folder_label = class_from_folder(folder)
        if label < 0 and folder_label is not None:
            label = folder_label
        elif folder_label not in (None, label):
            raise DataError(
                f"{path}: file name says class {label} but it is in folder {folder!r} "
                f"(class {folder_label}); fix the file or its folder"
            )
    m = _NAME.fullmatch(stem)
    if m is None:
        return None, -1, -1, label
    return m["patient"], int(m["x"]), int(m["y"]), label


def parse_patch_name(name: str) -> dict | None:
    """The fields of a Kaggle name ``<patient>_idx5_x<X>_y<Y>_class<C>.png``; None for any
    other name (where the patient and place are needed: patient zips, the Kaggle layout)."""
    patient, x, y, label = parse_name(name, folder="")
    return None if patient is None else {"patient": patient, "x": x, "y": y, "label": label}


def class_from_folder(name: str) -> int | None:
    """The class a folder's name stands for (``0``, ``idc``, ``benign``, ...); None if none."""
    return _CLASS_ALIASES.get(name.lower())


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header; raises ``DataError`` naming the file."""
    from .decode import MAX_PIXELS, head_size

    try:
        with Path(path).open("rb") as f:
            size = head_size(f.read(24))
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from e
    except ValueError as e:
        raise DataError(f"{path}: {e}") from e
    if size is not None:
        return size
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from e
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: too large for a patch ({e})") from e
    # Refused here, from the header, rather than by a decoder that would allocate the pixels.
    if w * h > MAX_PIXELS:
        raise DataError(f"{path}: {w}x{h} pixels is too large for a patch (decompression bomb?)")
    return w, h


def find_dataset_root(root: Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    inner = root / KAGGLE_TOP
    return inner if inner.is_dir() else root


def index_dataset(root: str | Path, read_sizes: bool = True) -> Index:
    """Index a dataset folder (Kaggle or plain layout) into an :class:`Index`.

    ``read_sizes`` reads each file's header for its size (and skips files whose header is
    bad); without it sizes are -1 and bad files are found when decoded, which is all
    scoring needs: a header read is an extra open per file, a third of a decode.
    """
    root = find_dataset_root(Path(root))
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if subdirs and all(class_from_folder(p.name) is not None for p in subdirs):
        layout, rows, skipped = "plain", *_index_plain(root, subdirs, read_sizes)
    else:
        layout, rows, skipped = "kaggle", *_index_kaggle(root, subdirs, read_sizes)
    table = _to_table(rows)
    if table.empty:
        raise DataError(
            f"{root}: no patches found; expected <patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_"
            f"class<C>.png or <class>/<image>.png ({len(skipped)} files skipped)"
        )
    if layout == "plain" and (table["patient"] == table["path"]).all():
        logger.warning(
            "%s: plain <class>/ layout without patient ids: every image is its own group, so "
            "splits cannot keep a patient's patches together",
            root,
        )
    _report_skipped(root, skipped)
    return Index(root=root, table=table, layout=layout, skipped=skipped)


def write_skipped(path: str | Path, skipped: list[tuple[str, str]]) -> Path:
    """Write the files left out, one ``path, reason`` row each, as a CSV that is replaced
    whole (``cache.write_atomic``): a reader never sees half a table. Every command that
    skips files (``train``, ``evaluate``, ``heatmap``) writes it with this function."""
    from .cache import write_atomic

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(SKIPPED_COLUMNS)
    writer.writerows(skipped)
    return write_atomic(Path(path), text.getvalue())


def roots_text(roots) -> str:
    """One dataset folder, or several, as a person reads them in a message."""
    return str(roots) if isinstance(roots, str | Path) else " + ".join(map(str, roots))


def index_datasets(roots, read_sizes: bool = True) -> Index:
    """Several dataset folders indexed as one (one folder: ``index_dataset``).

    Patients are merged by id across folders (the Kaggle download and extra patients of
    the same slides, say); paths are relative to the folders' common parent. A file name
    found twice for one patient is kept once when both files hold the same pixels and
    label, and is an error naming both files otherwise.
    """
    roots = [roots] if isinstance(roots, str | Path) else list(roots)
    if len(roots) == 1:
        return index_dataset(roots[0], read_sizes)
    indexes = [index_dataset(r, read_sizes) for r in roots]
    base = Path(os.path.commonpath([str(ix.root.resolve()) for ix in indexes]))
    tables, skipped = [], []
    for ix in indexes:
        prefix = ix.root.resolve().relative_to(base).as_posix()
        table = ix.table.copy()
        table["path"] = prefix + "/" + table["path"] if prefix != "." else table["path"]
        tables.append(table)
        skipped += [(f"{prefix}/{p}", why) for p, why in ix.skipped]
    table = _without_duplicates(pd.concat(tables, ignore_index=True), base)
    layouts = {ix.layout for ix in indexes}
    return Index(base, table, layouts.pop() if len(layouts) == 1 else "mixed", skipped)


def _without_duplicates(table: pd.DataFrame, base: Path) -> pd.DataFrame:
    names = table["path"].str.rsplit("/", n=1).str[-1]
    key = table["patient"] + "/" + names
    again = key.duplicated(keep=False)
    drop = []
    for _, rows in table[again].groupby(key[again]):
        first = rows.iloc[0]
        for _, other in rows.iloc[1:].iterrows():
            why = _conflict(base / first["path"], base / other["path"])
            if why or other["label"] != first["label"]:
                raise DataError(
                    f"{base / other['path']}: the same patch as {base / first['path']} "
                    f"(patient {first['patient']}, same file name) with "
                    f"{why or 'another label'}; remove one of them"
                )
            drop.append(other.name)
    if drop:
        logger.info("%d patches found in two folders, each kept once", len(drop))
    return table.drop(index=drop).reset_index(drop=True)


def _conflict(a: Path, b: Path) -> str:
    """ "" when two files hold the same image, else how they differ."""
    if a.read_bytes() == b.read_bytes():
        return ""
    from .decode import DECODE_ERRORS, decode_patch

    try:
        same = np.array_equal(decode_patch(a)[0], decode_patch(b)[0])
    except DECODE_ERRORS as e:
        return f"a file that cannot be compared ({e})"
    return "" if same else "other pixels"


def index_files(paths: list[str | Path], keep_missing: bool = False) -> Index:
    """Index loose files and folders (for prediction): labels and patients where names tell.

    Headers are not read (sizes are -1): a file that cannot be used is found, and
    reported, when it is decoded. A path that does not exist is an error, or, with
    ``keep_missing``, a row of its own that will fail to decode.
    """
    files: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            # Strings in the order of Path objects (part by part), and os.path below: a
            # table of plain strings is 4x faster to build, and predict waits for it.
            found = sorted(_walk_images(p), key=lambda s: s.split(os.sep))  # noqa: PTH206
            if not found:
                logger.warning(
                    "%s: no image files (%s) in this folder", p, ", ".join(IMAGE_SUFFIXES)
                )
            files.extend(found)
        elif p.exists() or keep_missing:
            files.append(str(p))
        else:
            raise DataError(f"{p}: no such file or folder")
    return Index(root=Path(), table=files_table(files), layout="files")


def files_table(files: list, names: list[str] | None = None) -> pd.DataFrame:
    """One row per file: its ``path``, and the patient, place and label :func:`parse_name`
    reads from it.

    ``names`` are the names to read (default: the files' paths; an upload is stored under
    another, and its name as sent has no folder). A name without a patient makes its stem
    the patient: a lone patch is its own patient. Sizes are -1 (not read).
    """
    paths = [str(f) for f in files]
    columns: dict[str, list] = {c: [] for c in ("patient", "x", "y", "label")}
    for name in paths if names is None else names:
        patient, *values = parse_name(name)
        if patient is None:
            patient = os.path.splitext(os.path.basename(name))[0]  # noqa: PTH119, PTH122
        for column, value in zip(columns.values(), (patient, *values), strict=True):
            column.append(value)
    n = len(paths)
    return pd.DataFrame(
        {
            "path": pd.Series(paths, dtype=object),
            "patient": pd.Series(columns["patient"], dtype=object),
            **{c: np.asarray(columns[c], dtype=np.int64).reshape(n) for c in ("x", "y", "label")},
            "width": np.full(n, -1, np.int64),
            "height": np.full(n, -1, np.int64),
        }
    )


def _index_kaggle(root: Path, patient_dirs: list[Path], sizes: bool) -> tuple[list[dict], list]:
    rows: list[dict] = []
    skipped: list[tuple[str, str]] = []
    for pdir in patient_dirs:
        for cdir in sorted(p for p in pdir.iterdir() if p.is_dir()):
            folder_label = class_from_folder(cdir.name)
            if folder_label is None:
                logger.warning("%s: not a class folder (expected 0 or 1), ignored", cdir)
                continue
            top, under = f"{pdir.name}/{cdir.name}/", len(str(cdir)) + 1
            # Strings, in the order of Path objects: a Path per file costs more than its row.
            for f in sorted(_walk_images(cdir), key=lambda s: s.split(os.sep)):  # noqa: PTH206
                rel = top + f[under:].replace(os.sep, "/")
                patient, x, y, _ = parse_name(f, cdir.name, check_folder=True)
                if patient is None:  # the patient and place are needed (splits, the grid)
                    skipped.append((rel, "file name is not <patient>_idx5_x<X>_y<Y>_class<C>.png"))
                    continue
                if patient != pdir.name:
                    logger.warning("%s: patient %s in name, folder %s", f, patient, pdir.name)
                row = _row(rel, pdir.name, x, y, folder_label)
                _append_sized(rows, skipped, row, f, sizes)
    return rows, skipped


def _index_plain(root: Path, class_dirs: list[Path], sizes: bool) -> tuple[list[dict], list]:
    rows: list[dict] = []
    skipped: list[tuple[str, str]] = []
    for cdir in class_dirs:
        label = class_from_folder(cdir.name)
        for f in sorted(map(Path, _walk_images(cdir))):
            rel = f.relative_to(root).as_posix()
            patient, x, y, _ = parse_name(str(f), cdir.name, check_folder=True)
            # A name without a patient: the file is its own group, under its unique path.
            row = _row(rel, patient or rel, x, y, label)
            _append_sized(rows, skipped, row, f, sizes)
    return rows, skipped


def _walk_images(folder: Path):
    """Image files under ``folder``, as strings (Path objects cost more than the walk)."""
    # os.walk with followlinks=False cannot loop on symlinked folders.
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                yield os.path.join(dirpath, name)  # noqa: PTH118


def _row(rel: str, patient: str, x: int, y: int, label: int) -> dict:
    return {"path": rel, "patient": str(patient), "x": x, "y": y, "label": int(label)}


def _append_sized(rows: list[dict], skipped: list, row: dict, f, sizes: bool = True) -> None:
    if not sizes:
        rows.append({**row, "width": -1, "height": -1})
        return
    try:
        row["width"], row["height"] = image_size(f)
    except DataError as e:
        skipped.append((row["path"], str(e).split(": ", 1)[-1]))
        return
    rows.append(row)


def _to_table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.astype(
        {
            "x": "int64",
            "y": "int64",
            "label": "int64",
            "width": "int64",
            "height": "int64",
            "path": str,
            "patient": str,
        }
    )


def _report_skipped(root: Path, skipped: list[tuple[str, str]]) -> None:
    for path, reason in skipped[:10]:
        logger.warning("skipped %s: %s", path, reason)
    if len(skipped) > 10:
        logger.warning("... and %d more skipped files under %s", len(skipped) - 10, root)


def summarize(table: pd.DataFrame) -> dict:
    """Counts a person wants to see after indexing."""
    known = table["width"] >= 0  # -1: indexed without reading headers
    small = known & ((table["width"] < 50) | (table["height"] < 50))
    return {
        "n_patches": len(table),
        "n_patients": int(table["patient"].nunique()),
        "n_positive": int((table["label"] == 1).sum()),
        "positive_fraction": float((table["label"] == 1).mean()) if len(table) else 0.0,
        "n_smaller_than_50": int(small.sum()),
    }
