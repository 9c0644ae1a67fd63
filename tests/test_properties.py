"""Properties that hold for any input: names, splits, augmentations, image decoding."""

from __future__ import annotations

import io
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from idcscope.data import augment as A
from idcscope.data.decode import DECODE_ERRORS, PATCH_SIZE, decode_patch
from idcscope.data.manifest import KAGGLE_TOP, class_from_folder, index_dataset, parse_patch_name
from idcscope.data.splits import (
    assign,
    check_disjoint,
    load_splits,
    patient_folds,
    patient_split,
    save_splits,
)
from idcscope.errors import DataError
from tests.badinputs import bomb_png

FEW = settings(max_examples=50, deadline=None)
SOME = settings(max_examples=100, deadline=None)
ON_DISK = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# ----------------------------------------------------------------------------- file names

# Anything a file name may hold but a path separator (and NUL, which no file name holds).
name_chars = st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",))
patient_ids = st.text(name_chars, min_size=1, max_size=24)
coordinates = st.integers(0, 999_999_999)


@SOME
@given(st.text())
def test_parse_never_raises(text):
    meta = parse_patch_name(text)
    assert meta is None or (
        isinstance(meta["patient"], str)
        and 0 <= meta["x"] < 10**9
        and 0 <= meta["y"] < 10**9
        and meta["label"] in (0, 1)
    )


@SOME
@given(patient_ids, st.integers(0, 99), coordinates, coordinates, st.sampled_from([0, 1]))
def test_parse_round_trips_valid_names(patient, idx, x, y, label):
    name = f"{patient}_idx{idx}_x{x}_y{y}_class{label}.png"
    assert parse_patch_name(name) == {"patient": patient, "x": x, "y": y, "label": label}


@SOME
@given(patient_ids, st.integers(10**9, 10**40), coordinates)
def test_parse_refuses_coordinates_no_slide_has(patient, x, y):
    assert parse_patch_name(f"{patient}_idx5_x{x}_y{y}_class0.png") is None


def _folder_name(pid: str) -> bool:
    """What the layout rules allow as a patient folder."""
    return not pid.startswith(".") and pid != KAGGLE_TOP and len(pid.encode()) <= 100


patches = st.tuples(coordinates, coordinates, st.sampled_from([0, 1]))
patients = st.dictionaries(
    patient_ids.filter(_folder_name),
    st.lists(patches, min_size=1, max_size=3),
    min_size=1,
    max_size=4,
)
PNG = io.BytesIO()
Image.new("RGB", (50, 50), (200, 100, 150)).save(PNG, format="PNG")


@ON_DISK
@given(patients)
def test_index_gives_back_the_patches_written(tmp_path_factory, data):
    assume(not all(class_from_folder(p) is not None for p in data))  # else: the plain layout
    root = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    written = set()
    for pid, items in data.items():
        for x, y, label in items:
            folder = root / pid / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{pid}_idx5_x{x}_y{y}_class{label}.png").write_bytes(PNG.getvalue())
            written.add((pid, x, y, label))
    ix = index_dataset(root)
    assert ix.layout == "kaggle" and not ix.skipped
    got = set(ix.table[["patient", "x", "y", "label"]].itertuples(index=False, name=None))
    assert got == written
    assert ix.table["path"].tolist() == sorted(ix.table["path"])  # a deterministic order


# ----------------------------------------------------------------------------- splits


@st.composite
def patient_tables(draw, min_patients=3):
    ids = draw(
        st.lists(st.text(min_size=1, max_size=8), min_size=min_patients, max_size=25, unique=True)
    )
    rows = []
    for pid in ids:
        labels = draw(st.lists(st.sampled_from([0, 1]), min_size=1, max_size=6))
        rows += [{"patient": pid, "label": label} for label in labels]
    return pd.DataFrame(rows)


fractions = st.floats(0.05, 0.4)
seeds = st.integers(0, 2**32 - 1)


def _split_or_skip(table, val, test, seed) -> dict:
    try:
        return patient_split(table, val, test, seed)
    except DataError:  # too few patients for these fractions: refused, clearly
        assume(False)


@SOME
@given(patient_tables(), fractions, fractions, seeds)
def test_split_puts_every_patient_on_exactly_one_side(table, val, test, seed):
    splits = _split_or_skip(table, val, test, seed)
    sides = [set(splits[name]) for name in ("train", "val", "test")]
    assert set.union(*sides) == set(table["patient"])
    assert sum(map(len, sides)) == table["patient"].nunique()
    assert splits["train"]
    check_disjoint(splits)
    assert (assign(table, splits) != "").all()


@FEW
@given(patient_tables(), fractions, fractions, seeds)
def test_split_is_a_function_of_the_seed(table, val, test, seed):
    first = _split_or_skip(table, val, test, seed)
    shuffled = table.sample(frac=1, random_state=0).reset_index(drop=True)
    assert patient_split(shuffled, val, test, seed) == first


@ON_DISK
@given(patient_tables(), fractions, fractions, seeds)
def test_split_file_round_trips(tmp_path_factory, table, val, test, seed):
    splits = _split_or_skip(table, val, test, seed)
    path = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())) / "splits.json"
    save_splits(splits, path)
    assert load_splits(path) == splits
    assert load_splits(path, table, seed) == splits  # a "val" list is kept as it is


@FEW
@given(patient_tables(min_patients=4), seeds)
def test_published_folds_without_val_get_val_from_train(table, seed):
    pids = sorted(set(table["patient"]))
    folds = {"train": pids[:-1], "test": pids[-1:]}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "folds.json"
        path.write_text(json.dumps(folds))
        splits = load_splits(path, table, seed)
    assert splits["val"] and set(splits["val"]) <= set(folds["train"])
    assert set(splits["train"]) | set(splits["val"]) == set(folds["train"])
    check_disjoint(splits)


@FEW
@given(patient_tables(), st.integers(2, 6), seeds)
def test_folds_partition_the_patients(table, k, seed):
    assume(k <= table["patient"].nunique())
    folds = patient_folds(table, k, seed)
    flat = [p for fold in folds for p in fold]
    assert sorted(flat) == sorted(set(table["patient"]))
    assert max(map(len, folds)) - min(map(len, folds)) <= 1


# ----------------------------------------------------------------------------- augmentation


@st.composite
def batches(draw, square=True):
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    w = h if square else draw(st.integers(1, 12))
    pixels = draw(arrays(np.uint8, (b, 3, h, w)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return torch.from_numpy(pixels).to(dtype) / 255


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


AUGMENTS = {
    "dihedral": A.dihedral,
    "affine": A.random_affine,
    "color": A.color_jitter,
    "hed": A.hed_jitter,
    "preset default": A.create_augment("default"),
    "preset report": A.create_augment("report"),
}


@pytest.mark.parametrize("name", list(AUGMENTS))
@FEW
@given(x=batches(), seed=seeds)
def test_augment_keeps_shape_dtype_and_range(name, x, seed):
    y = AUGMENTS[name](x, _gen(seed))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= -1e-6 and y.max() <= 1 + 1e-6
    assert torch.equal(y, AUGMENTS[name](x, _gen(seed)))  # same seed, same augmentation


@FEW
@given(x=batches(square=False), seed=seeds)
def test_affine_stays_within_the_input_values(x, seed):
    y = A.random_affine(x, _gen(seed))
    assert y.min() >= x.min() - 1e-5 and y.max() <= x.max() + 1e-5


STRENGTH_ZERO = {
    "affine": lambda x, g: A.random_affine(
        x, g, degrees=0, zoom=(1, 1), shift=0, shear=0, hflip=False, vflip=False
    ),
    "color": lambda x, g: A.color_jitter(x, g, brightness=0, contrast=0, saturation=0, hue=0),
    "hed": lambda x, g: A.hed_jitter(x, g, sigma=0, bias=0),
    "preset none": lambda x, g: A.create_augment("none")(x, g),
    "no-op Augment": lambda x, g: A.Augment(dihedral=False, affine=False, color=0, hed=0)(x, g),
}


@pytest.mark.parametrize("name", list(STRENGTH_ZERO))
@FEW
@given(x=batches(square=False), seed=seeds)
def test_strength_zero_is_the_identity(name, x, seed):
    torch.testing.assert_close(STRENGTH_ZERO[name](x, _gen(seed)), x, atol=1e-5, rtol=0)


@FEW
@given(x=batches())
def test_every_dihedral_transform_is_undone_by_another(x):
    for view in A.dihedral_all(x):
        assert any(torch.equal(back, x) for back in A.dihedral_all(view))


@FEW
@given(x=batches(), seed=seeds)
def test_random_dihedral_is_one_of_the_eight(x, seed):
    y = A.dihedral(x, _gen(seed))
    views = A.dihedral_all(x)
    for i in range(len(x)):
        assert any(torch.equal(y[i], v[i]) for v in views)


@FEW
@given(x=batches())
def test_tta_of_an_orientation_free_function_changes_nothing(x):
    def total(v):
        return v.sum(dim=(1, 2, 3))

    views = A.dihedral_all(x).flatten(0, 1)  # as TTA scores them: 8 views in one batch
    torch.testing.assert_close(total(views).view(8, -1).mean(0), total(x))


# ----------------------------------------------------------------------------- decoding


def _encoded(mode: str, fmt: str, size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img)[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


FORMATS = {  # what each Pillow writer takes
    "PNG": ["RGB", "RGBA", "L", "LA", "P", "1", "I;16"],
    "JPEG": ["RGB", "L", "CMYK"],
    "BMP": ["RGB", "L", "P", "1"],
    "GIF": ["P", "L"],
    "TIFF": ["RGB", "RGBA", "L", "CMYK", "I;16"],
    "WEBP": ["RGB", "RGBA"],
}
images = st.sampled_from([(f, m) for f, modes in FORMATS.items() for m in modes]).flatmap(
    lambda fm: st.builds(
        _encoded,
        st.just(fm[1]),
        st.just(fm[0]),
        st.tuples(st.integers(1, 120), st.integers(1, 120)),
        st.integers(0, 1000),
    )
)


@st.composite
def damaged(draw):
    data = bytearray(draw(images))
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


def _decode_bytes(base: Path, data: bytes):
    path = base / "patch.png"
    path.write_bytes(data)
    return decode_patch(path)


def _usable_or_clear_error(base: Path, data: bytes) -> None:
    try:
        arr, how = _decode_bytes(base, data)
    except DECODE_ERRORS:
        return
    assert arr.shape == (PATCH_SIZE, PATCH_SIZE, 3) and arr.dtype == np.uint8
    assert how in ("", "padded", "resized")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("decode")


def _bmp_claiming(width: int, height: int) -> bytes:
    """A small BMP whose header says it is ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="BMP")
    data = bytearray(buf.getvalue())
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


@SOME
@given(data=st.binary(max_size=4096))
@example(data=bomb_png(20_000))  # Pillow refuses it with its own DecompressionBombError
@example(data=bomb_png(10_000))  # ... or only warns, which decode_patch turns into an error
@example(data=_bmp_claiming(100_000, 100_000))
def test_decode_arbitrary_bytes(scratch, data):
    _usable_or_clear_error(scratch, data)


@SOME
@given(data=damaged())
def test_decode_damaged_images(scratch, data):
    _usable_or_clear_error(scratch, data)


@FEW
@given(data=images)
def test_decode_any_valid_image_to_a_patch(scratch, data):
    arr, _ = _decode_bytes(scratch, data)
    assert arr.shape == (PATCH_SIZE, PATCH_SIZE, 3) and arr.dtype == np.uint8
