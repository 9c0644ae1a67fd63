import numpy as np
import pytest
from PIL import Image

from idcscope.data.cache import load_or_build
from idcscope.data.dataset import load_patch_data
from idcscope.data.decode import decode_patch
from idcscope.data.manifest import index_dataset
from tests.conftest import write_patch


def test_decode_pads_small_patches_with_white(tmp_path):
    p = write_patch(tmp_path / "a.png", size=(50, 7), color=(10, 20, 30))
    arr, how = decode_patch(p)
    assert arr.shape == (50, 50, 3) and arr.dtype == np.uint8 and how == "padded"
    assert (arr[:7] == (10, 20, 30)).all() and (arr[7:] == 255).all()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_decode_converts_modes_to_rgb(tmp_path, mode):
    p = tmp_path / f"{mode.replace(';', '')}.png"
    img = Image.new("RGB", (50, 50), (120, 60, 200))
    if mode == "I;16":
        img = Image.fromarray(np.full((50, 50), 40000, np.uint16))
    else:
        img = img.convert(mode)
    img.save(p)
    arr, _ = decode_patch(p)
    assert arr.shape == (50, 50, 3)
    if mode == "I;16":
        assert arr.max() == 255  # scaled from 16 bits, not clipped to 255 from 40000


def test_decode_resizes_large_images(tmp_path):
    p = write_patch(tmp_path / "big.png", size=(100, 100))
    arr, how = decode_patch(p)
    assert arr.shape == (50, 50, 3) and how == "resized"


def test_cache_builds_once_and_reports_failures(tiny_tree, tmp_path):
    # A file with a valid PNG header but a corrupt body passes indexing and fails decoding.
    good = next((tiny_tree / "101" / "0").glob("*.png")).read_bytes()
    bad = tiny_tree / "101" / "0" / "101_idx5_x999_y999_class0.png"
    bad.write_bytes(good[:40])
    ix = index_dataset(tiny_tree)
    assert bad.name in " ".join(ix.table["path"])
    first = load_or_build(ix.root, ix.table, tmp_path / "c", workers=1)
    assert (~first.ok).sum() == 1 and first.n_padded == 1
    assert first.errors[0][0].endswith(bad.name)
    again = load_or_build(ix.root, ix.table, tmp_path / "c")
    assert isinstance(again.images, np.memmap)
    np.testing.assert_array_equal(np.asarray(again.images)[again.ok], first.images[first.ok])
    assert again.errors == first.errors


def test_a_replaced_file_is_decoded_again(tiny_tree, tmp_path):
    import os

    ix = index_dataset(tiny_tree)
    first = load_or_build(ix.root, ix.table, tmp_path / "c", workers=1)
    i = int(np.flatnonzero(ix.table["height"] == 50)[0])
    target = ix.root / ix.table["path"][i]
    before = target.stat()
    write_patch(target, color=(10, 200, 30))  # other pixels, the same 50x50
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    again = index_dataset(tiny_tree)
    assert again.table.equals(ix.table)  # the manifest alone cannot tell
    second = load_or_build(again.root, again.table, tmp_path / "c", workers=1)
    assert (second.images[i] == (10, 200, 30)).all()
    assert not (first.images[i] == (10, 200, 30)).all()
    others = np.arange(len(ix.table)) != i
    np.testing.assert_array_equal(np.asarray(second.images)[others], first.images[others])


def test_parallel_and_serial_decoding_agree(synthetic_root, tmp_path):
    ix = index_dataset(synthetic_root)
    a = load_or_build(ix.root, ix.table, tmp_path / "a", workers=1)
    b = load_or_build(ix.root, ix.table, tmp_path / "b", workers=2)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))


def test_patch_data_accounts_for_every_file(tiny_tree):
    (tiny_tree / "101" / "0" / "101_idx5_x9_y9_class0.png").write_bytes(b"")
    data = load_patch_data(tiny_tree)
    s = data.summary()
    assert s["n_patches"] + s["n_skipped"] == s["n_files"] == 14
