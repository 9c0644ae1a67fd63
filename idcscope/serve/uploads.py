"""Receiving uploads safely: streamed multipart files under a size limit, and checked zips.

Nothing a client names is used as a path as sent. Uploaded files are stored under a
sanitised name inside the request's own folder; zip members are checked one by one (no
absolute paths, no ``..``, a bounded count and unpacked size) and each patch is written where
its own file name says, so the zip's folders never decide where anything lands.

The pixels of a request's images are counted from their headers (:func:`image_pixels`)
before anything is decoded, and a request over its pixel budget is refused with 413: the
budget, not the file count, bounds the CPU one request can take. A client that disconnects
mid-upload raises Starlette's ``ClientDisconnect``, which the app logs in one line.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from ..data.manifest import parse_patch_name
from ..errors import IdcscopeError

PATCH_SUFFIXES = (".png", ".jpg", ".jpeg")
ZIP_SUFFIXES = (".zip",)
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".svslide")
MB = 1024 * 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 120
_CHUNK = 1024 * 1024


class UploadError(IdcscopeError):
    """An upload refused as a whole; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, files: list[dict] | None = None):
        super().__init__(message)
        self.status, self.files = status, files or []


@dataclass
class Upload:
    """One file of a multipart upload: its name as sent and where it was stored."""

    name: str
    path: Path | None = None  # None when refused
    size: int = 0
    error: str = ""


def client_name(raw: str) -> str:
    """The base name of a client's file name, whatever separator its system uses."""
    return _shorten(re.split(r"[\\/]", raw)[-1].strip(), 200) or "upload"


def safe_name(raw: str) -> str:
    """A file name made only of letters, digits, '.', '_' and '-', never hidden or empty."""
    return _shorten(_UNSAFE.sub("_", client_name(raw)).lstrip("."), _MAX_NAME) or "upload"


def _shorten(name: str, n: int) -> str:
    stem, dot, suffix = name.rpartition(".")
    if len(name) > n and dot and len(suffix) < 10:
        return f"{stem[: n - len(suffix) - 1]}.{suffix}"
    return name[:n]


def _unique(folder: Path, name: str) -> Path:
    path, k = folder / name, 2
    while path.exists():
        path, k = folder / f"{Path(name).stem}-{k}{Path(name).suffix}", k + 1
    return path


class _FileSink:
    """python-multipart callbacks that write each file part straight into one folder."""

    def __init__(self, dest: Path, suffixes: tuple[str, ...], max_files: int):
        self.dest, self.suffixes, self.max_files = dest, suffixes, max_files
        self.uploads: list[Upload] = []
        self._field, self._value, self._disposition = b"", b"", b""
        self._file = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": lambda d, s, e: setattr(self, "_field", self._field + d[s:e]),
            "on_header_value": lambda d, s, e: setattr(self, "_value", self._value + d[s:e]),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.close,
        }

    def on_part_begin(self) -> None:
        self._disposition, self._file = b"", None

    def on_header_end(self) -> None:
        if self._field.lower() == b"content-disposition":
            self._disposition = self._value
        self._field, self._value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"filename" not in options:
            return  # a plain form field: nothing here reads one
        if len(self.uploads) >= self.max_files:
            raise UploadError(413, f"more than {self.max_files} files in one upload")
        upload = Upload(client_name(options[b"filename"].decode("utf-8", "replace")))
        self.uploads.append(upload)
        suffix = Path(upload.name).suffix.lower()
        if suffix not in self.suffixes:
            upload.error = (
                f"{suffix or 'no extension'} not accepted here: {', '.join(self.suffixes)}"
            )
            return
        upload.path = _unique(self.dest, safe_name(upload.name))
        self._file = upload.path.open("xb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])
            self.uploads[-1].size += end - start

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def receive_files(
    request: Request, dest: Path, suffixes: tuple[str, ...], max_bytes: int, max_files: int
) -> list[Upload]:
    """Stream the files of a multipart request into ``dest``, within ``max_bytes`` in all.

    Files with other suffixes than ``suffixes`` are not stored and come back with an error.

    Raises:
        UploadError: 413 when the request is larger than ``max_bytes`` or holds more than
            ``max_files`` files, 400 when it is not a readable multipart form with a file,
            415 when no file has an accepted suffix.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    kind, options = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise UploadError(400, "send the files as multipart/form-data")
    sink = _FileSink(dest, suffixes, max_files)
    received = 0
    try:
        parser = MultipartParser(options[b"boundary"], sink.callbacks())
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(received, max_bytes)
            parser.write(chunk)
        parser.finalize()
    except FormParserError as e:
        raise UploadError(400, f"malformed multipart upload: {e}") from e
    finally:
        sink.close()
    if not sink.uploads:
        raise UploadError(400, "the upload holds no file")
    if all(u.path is None for u in sink.uploads):
        files = [{"file": u.name, "error": u.error} for u in sink.uploads]
        raise UploadError(415, f"no file of an accepted type ({', '.join(suffixes)})", files)
    return sink.uploads


def image_pixels(path: Path) -> int:
    """The pixels decoding an image would produce, read from its header only.

    0 when the decoder refuses the file from its header alone, so costs nothing: a header
    Pillow cannot read, or one over ``decode.MAX_PIXELS`` (the file gets its own error row).
    """
    from PIL import Image

    from ..data.decode import MAX_PIXELS

    try:
        with Image.open(path) as im:  # reads the header only
            pixels = im.width * im.height
    except Exception:  # any malformed header (or a bomb): whatever Pillow raises, 0 decoded
        return 0
    return pixels if pixels <= MAX_PIXELS else 0


def check_pixels(uploads: list[Upload], max_pixels: int) -> None:
    """Refuse (413) uploads whose images hold more than ``max_pixels`` in all."""
    total = sum(image_pixels(u.path) for u in uploads if u.path is not None and not u.error)
    if total > max_pixels:
        raise _too_many_pixels(total, max_pixels)


def _too_many_pixels(n: int, max_pixels: int) -> UploadError:
    return UploadError(
        413,
        f"the images hold {n / 1e6:.1f} megapixels; the limit is {max_pixels / 1e6:g} "
        "megapixels a request (a 50x50 patch is 0.0025)",
    )


def _too_large(n: int, max_bytes: int) -> UploadError:
    return UploadError(
        413, f"upload too large: more than {n / MB:.1f} MB; the limit is {max_bytes / MB:g} MB"
    )


# ----------------------------------------------------------------------------- zips


@dataclass
class PatientZip:
    """One patient's patches unpacked from a zip."""

    folder: Path  # <dest>/<patient>, with 0/ and 1/ inside
    patient: str
    names: list[str] = field(default_factory=list)  # the patch file names written
    skipped: list[dict] = field(default_factory=list)  # {"file", "error"} per member left out


def check_member_name(name: str) -> None:
    """Refuse (400) a zip member whose path is absolute or climbs out with ``..`` (zip slip)."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise UploadError(400, f"refused zip member '{name}': absolute path")
    if ".." in re.split(r"[\\/]", name):
        raise UploadError(400, f"refused zip member '{name}': '..' in its path")


def extract_patient_zip(
    archive: Path, dest: Path, max_members: int, max_bytes: int, max_pixels: int | None = None
) -> PatientZip:
    """Unpack one patient's patches into ``dest/<patient>/<0|1>/``, checking every member.

    Patches must be named ``<patient>_idx5_x<X>_y<Y>_class<C>.png`` (Kaggle layout or flat);
    other members are listed in ``skipped``, hidden files and ``__MACOSX`` are ignored.

    Raises:
        UploadError: 400 for an unreadable zip or an unsafe member path, 413 for more than
            ``max_members`` members, more than ``max_bytes`` unpacked or patches of more than
            ``max_pixels`` in all, 422 when the zip holds no patch or several patients.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise UploadError(400, f"not a readable zip archive: {e}") from e
    with zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise UploadError(
                413, f"the zip holds {len(infos)} members; the limit is {max_members}"
            )
        for info in infos:
            check_member_name(info.filename)
        total = sum(i.file_size for i in infos)
        if total > max_bytes:
            raise UploadError(
                413, f"the zip unpacks to {total / MB:.1f} MB; the limit is {max_bytes / MB:g} MB"
            )
        return _unpack_patches(zf, infos, dest, max_pixels)


def _unpack_patches(zf: zipfile.ZipFile, infos: list, dest: Path, max_pixels) -> PatientZip:
    written: dict[str, str] = {}  # file name -> patient
    skipped: list[dict] = []
    pixels = 0
    for info in infos:
        base = info.filename.replace("\\", "/").rsplit("/", 1)[-1]
        if info.is_dir() or base.startswith(".") or info.filename.startswith("__MACOSX"):
            continue
        error = _patch_name_problem(base, written)
        meta = parse_patch_name(base)
        if not error:
            target = dest / meta["patient"] / str(meta["label"]) / base
            try:
                _copy_member(zf, info, target)
                written[base] = meta["patient"]
                pixels += image_pixels(target) if max_pixels is not None else 0
                if max_pixels is not None and pixels > max_pixels:
                    raise _too_many_pixels(pixels, max_pixels)  # before any is decoded
                continue
            except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, zlib.error) as e:
                error = f"cannot be unpacked: {e}"  # encrypted, corrupt, unknown compression
        skipped.append({"file": info.filename, "error": error})
    patients = sorted(set(written.values()))
    if not patients:
        raise UploadError(
            422, "no patch in the zip is named <patient>_idx5_x<X>_y<Y>_class<C>.png", skipped
        )
    if len(patients) > 1:
        shown = ", ".join(patients[:5]) + (", ..." if len(patients) > 5 else "")
        raise UploadError(422, f"the zip holds {len(patients)} patients ({shown}); upload one")
    return PatientZip(dest / patients[0], patients[0], sorted(written), skipped)


def _patch_name_problem(base: str, written: dict[str, str]) -> str:
    if Path(base).suffix.lower() not in PATCH_SUFFIXES:
        return "not a PNG or JPEG patch"
    if _UNSAFE.search(base):
        return "name has characters other than letters, digits, '.', '_' and '-'"
    if parse_patch_name(base) is None:
        return "name is not <patient>_idx5_x<X>_y<Y>_class<C>.png"
    if base in written:
        return "the same file name appears twice"
    return ""


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> None:
    # zipfile stops at the size the header declares and checks the CRC, so a member cannot
    # unpack to more than the total checked above.
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zf.open(info) as src, target.open("xb") as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
