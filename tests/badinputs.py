"""A corpus of bad inputs, written on demand, with what should become of every file.

``make_corpus(root)`` writes a dataset in the Kaggle layout: healthy synthetic patients,
patient ``201`` holding one file of each kind in :data:`SPECS` beside good patches, a
patient whose folder name is not ASCII, empty folders and a folder link back to its parent.
Each spec says whether the indexer keeps the file, whether it decodes, and what the message
about it must say. Datasets that no entry point can use as a whole (a label conflict, one
class only, nothing but empty folders, nothing readable) come from their own builders.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BAD_PATIENT = "201"
UNICODE_PATIENT = "患者_é"
SYNTHETIC_PATIENTS = ("90001", "90002", "90003", "90004")


# ----------------------------------------------------------------------------- raw images


def _chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def png_from_parts(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    """A PNG written by hand, so that its header can claim anything."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return PNG_MAGIC + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def bomb_png(side: int) -> bytes:
    """A few hundred bytes claiming ``side`` x ``side`` RGB pixels: a decompression bomb."""
    return png_from_parts(side, side, 8, 2, zlib.compress(b"\0" * 4096))


def rgb16_png(size: int = 50) -> bytes:
    """A 48-bit RGB PNG (16 bits per channel), which Pillow cannot write itself."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 65535, (size, size * 3), dtype=np.uint16).astype(">u2").tobytes()
    row = size * 6
    raw = b"".join(b"\0" + pixels[r * row : (r + 1) * row] for r in range(size))
    return png_from_parts(size, size, 16, 2, zlib.compress(raw))


def patch_bytes(seed: int, size=(50, 50), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    """A random-pixel patch encoded as ``fmt`` in Pillow mode ``mode``."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(60, 230, (size[1], size[0], 3), dtype=np.uint8))
    options = {}
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img)[..., 0].astype(np.uint16) * 257)
    elif mode == "P+transparency":
        img, options = img.convert("P"), {"transparency": 0}
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def garbled_idat(png: bytes) -> bytes:
    """The header of ``png`` over compressed pixels that are garbage, checksums all valid."""
    ihdr_end = 8 + 8 + 13 + 4
    return png[:ihdr_end] + _chunk(b"IDAT", b"\x78\x9c" + b"\xff" * 64) + _chunk(b"IEND", b"")


def flipped_idat(png: bytes) -> bytes:
    """``png`` with damaged compressed pixels and a checksum that no longer matches."""
    start = png.index(b"IDAT") + 4
    body = bytearray(png)
    for i in range(start + 10, min(start + 40, len(body) - 12)):
        body[i] ^= 0x5A
    return bytes(body)


GOOD = patch_bytes(7)


# ----------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Spec:
    """One kind of file and what should become of it.

    Attributes:
        kind: what is wrong (or unusual) with the file.
        data: its bytes; None for a symbolic link.
        indexed: the indexer keeps it (its header reads and its name parses).
        decodes: it decodes to a 50x50 RGB patch.
        reason: a regex the message about the file must match when it is skipped.
        name: its file name, when not the patient's next ``201_idx5_x1_y<Y>_class<C>.png``.
        label: the class folder it sits in.
        link: for a symbolic link, where it points.
    """

    kind: str
    data: Callable[[], bytes] | None
    indexed: bool = True
    decodes: bool = True
    reason: str = ""
    name: str | None = None
    label: int = 0
    link: str | None = None

    @property
    def needs_name(self) -> bool:
        """Skipped only for its name, which ``predict`` does not need."""
        return not self.indexed and self.decodes


def _named(name: str, reason: str = "file name") -> dict:
    return {"data": lambda: GOOD, "indexed": False, "decodes": True, "reason": reason, "name": name}


SPECS: tuple[Spec, ...] = (
    # Unreadable at the header: the indexer skips them.
    Spec("zero_byte", lambda: b"", False, False, "empty"),
    Spec("truncated_header", lambda: GOOD[:20], False, False, "truncated"),
    Spec("png_magic_then_zeros", lambda: PNG_MAGIC + b"\0" * 40, False, False, "corrupt PNG"),
    Spec("text_named_png", lambda: b"patient notes\n", False, False, "not a readable image"),
    Spec("html_named_png", lambda: b"<html>404</html>", False, False, "not a readable image"),
    Spec("zero_width_png", lambda: png_from_parts(0, 50, 8, 2, b""), False, False, "0x50"),
    Spec("bomb_2x_pil_limit", lambda: bomb_png(20_000), False, False, "too large"),
    Spec("bomb_1x_pil_limit", lambda: bomb_png(10_000), False, False, "too large"),
    Spec("oversized_5000px", lambda: bomb_png(5_000), False, False, "too large"),
    # Names without what the Kaggle layout needs.
    Spec("name_without_coordinates", **_named("scan_0001.png")),
    Spec("name_without_patient", **_named("_idx5_x1_y1_class0.png")),
    Spec("name_class_2", **_named("201_idx5_x1_y1_class2.png")),
    Spec("name_huge_coordinate", **_named(f"201_idx5_x{'9' * 30}_y1_class0.png")),
    # Links that lead nowhere.
    Spec("symlink_loop", None, False, False, "symbolic links", link="loop"),
    Spec("symlink_loop_partner", None, False, False, "symbolic links", link="loop"),
    Spec("dangling_symlink", None, False, False, "No such file", link="missing.png"),
    # Good headers over bad pixels: the indexer keeps them, decoding skips them.
    Spec("truncated_pixels", lambda: GOOD[: len(GOOD) * 2 // 3], True, False, "truncated"),
    Spec("garbled_pixels", lambda: garbled_idat(GOOD), True, False, "broken data stream"),
    Spec("pixels_fail_checksum", lambda: flipped_idat(GOOD), True, False, "broken|crc|decod"),
    # Unusual but valid images: all of them are used.
    Spec("grayscale", lambda: patch_bytes(11, mode="L")),
    Spec("grayscale_alpha", lambda: patch_bytes(12, mode="LA")),
    Spec("bilevel", lambda: patch_bytes(13, mode="1")),
    Spec("rgba", lambda: patch_bytes(14, mode="RGBA")),
    Spec("palette", lambda: patch_bytes(15, mode="P")),
    Spec("palette_transparency", lambda: patch_bytes(16, mode="P+transparency")),
    Spec("grey_16bit", lambda: patch_bytes(17, mode="I;16")),
    Spec("rgb_16bit", rgb16_png),
    Spec("jpeg_named_png", lambda: patch_bytes(18, fmt="JPEG")),
    Spec("cmyk_jpeg_named_png", lambda: patch_bytes(19, mode="CMYK", fmt="JPEG")),
    Spec("jpeg_file", lambda: patch_bytes(20, fmt="JPEG"), name="201_idx5_x1_y9001_class0.jpg"),
    Spec("upper_case_suffix", lambda: patch_bytes(21), name="201_idx5_x1_y9051_class0.PNG"),
    Spec("edge_50x1", lambda: patch_bytes(22, size=(50, 1))),
    Spec("edge_1x50", lambda: patch_bytes(23, size=(1, 50))),
    Spec("larger_100x100", lambda: patch_bytes(24, size=(100, 100))),
    Spec("duplicate_a", lambda: patch_bytes(25), label=1),
    Spec("duplicate_b", lambda: patch_bytes(25), label=1),
)
KINDS = tuple(s.kind for s in SPECS)


@dataclass
class Corpus:
    root: Path
    paths: dict[str, str]  # kind -> file, relative to root
    good_files: list[str] = field(default_factory=list)  # healthy patches, relative to root

    @property
    def files(self) -> list[str]:
        """Every input file, relative to the root."""
        return self.good_files + list(self.paths.values())

    def files_of(self, patient: str) -> list[str]:
        return [f for f in self.files if f.split("/")[0] == patient]

    def spec(self, kind: str) -> Spec:
        return next(s for s in SPECS if s.kind == kind)


# ----------------------------------------------------------------------------- datasets


def _name(patient: str, x: int, y: int, label: int) -> str:
    return f"{patient}_idx5_x{x}_y{y}_class{label}.png"


def _write(root: Path, rel: str, data: bytes) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return rel


def _good_patient(root: Path, patient: str, n_per_class: int, seed: int) -> list[str]:
    files = []
    for label in (0, 1):
        for k in range(n_per_class):
            rel = f"{patient}/{label}/{_name(patient, 50 * k + 1, 50 * label + 1, label)}"
            files.append(_write(root, rel, patch_bytes(seed * 100 + 10 * label + k)))
    return files


def make_corpus(root: Path) -> Corpus:
    """The mixed dataset: healthy patients, patient 201 with every kind, a non-ASCII patient."""
    from idcscope.data.synthetic import make_synthetic_dataset

    root = Path(root)
    make_synthetic_dataset(root, n_patients=len(SYNTHETIC_PATIENTS), grid=(5, 5), seed=3)
    good = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    good += _good_patient(root, BAD_PATIENT, 4, seed=1)
    good += _good_patient(root, UNICODE_PATIENT, 4, seed=2)

    paths: dict[str, str] = {}
    for row, spec in enumerate(SPECS):  # each file in its own grid row of patient 201
        name = spec.name or _name(BAD_PATIENT, 1, 301 + 50 * row, spec.label)
        paths[spec.kind] = f"{BAD_PATIENT}/{spec.label}/{name}"
    for spec in SPECS:
        path = root / paths[spec.kind]
        if spec.data is not None:
            _write(root, paths[spec.kind], spec.data())
        elif spec.link == "loop":  # the two loop files point at each other
            partner = "symlink_loop_partner" if spec.kind == "symlink_loop" else "symlink_loop"
            path.symlink_to(Path(paths[partner]).name)
        else:
            path.symlink_to(spec.link)

    # Folders with nothing in them, and a folder link back to its parent.
    (root / BAD_PATIENT / "1" / "empty_subfolder").mkdir()
    (root / "90099").mkdir()
    (root / "90098" / "0").mkdir(parents=True)
    (root / BAD_PATIENT / "0" / "loop_to_parent").symlink_to("..")
    return Corpus(root=root, paths=paths, good_files=good)


def make_label_conflict(root: Path) -> Path:
    """Healthy patients, and one file whose name says class 1 inside folder 0; returns that file."""
    _good_patient(root, "301", 3, seed=30)
    _good_patient(root, "302", 3, seed=31)
    return root / _write(root, f"301/0/{_name('301', 1, 9001, 1)}", patch_bytes(32))


def make_one_class(root: Path, n_patients: int = 5) -> Path:
    """Patients without a single IDC patch."""
    for i in range(n_patients):
        pid = f"40{i}"
        for k in range(4):
            _write(root, f"{pid}/0/{_name(pid, 50 * k + 1, 1, 0)}", patch_bytes(40 + 10 * i + k))
    return root


def make_empty(root: Path) -> Path:
    """Patient and class folders without a single file."""
    for folder in ("501/0", "501/1", "502/0", "503"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    return root


def make_unreadable(root: Path, n_patients: int = 4) -> Path:
    """Patches whose headers read but whose pixels never decode."""
    bad = garbled_idat(GOOD)
    for i in range(n_patients):
        pid = f"60{i}"
        for label in (0, 1):
            _write(root, f"{pid}/{label}/{_name(pid, 1, 50 * label + 1, label)}", bad)
    return root
