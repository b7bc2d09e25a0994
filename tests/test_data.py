"""Training images: conversions, skips and errors, captions, buckets, batches, output folders."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, features

from studio.errors import StudioError
from studio.trainers import data as data_mod
from studio.trainers.data import ImageSet, load_image_folder, make_buckets, nearest_bucket, validate_output_dir

RES = 32  # every fixture image is RES x RES unless it tests resizing: pixel values stay exact


def _solid(mode: str, color, size=(RES, RES)) -> Image.Image:
    return Image.new(mode, size, color)


def _halves(left, right, size=(64, 32)) -> Image.Image:
    """RGB image, left half one colour, right half another."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = left
    a[:, w // 2:] = right
    return Image.fromarray(a)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (a decompression bomb), with almost no data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _px(ds: ImageSet, name: str, xy=(RES // 2, RES // 2)) -> tuple[int, ...]:
    item = next(it for it in ds.items if it.path.name == name)
    assert item.image.mode == "RGB"
    return item.image.getpixel(xy)


# ---------------------------------------------------------------------------------------------
# conversions

@pytest.fixture(scope="module")
def modes_set(tmp_path_factory) -> ImageSet:
    d = tmp_path_factory.mktemp("modes")
    _solid("RGB", (10, 200, 30)).save(d / "rgb.png")
    _solid("L", 100).save(d / "gray.png")
    _solid("1", 1).save(d / "bilevel.png")
    # LA and RGBA: left half fully transparent over BLACK colour values -> must become white
    la = np.zeros((RES, RES, 2), np.uint8)
    la[:, RES // 2:] = (60, 255)
    Image.fromarray(la, "LA").save(d / "la.png")
    rgba = np.zeros((RES, RES, 4), np.uint8)
    rgba[:, RES // 2:] = (255, 0, 0, 255)
    rgba[:4, RES // 2:] = (255, 0, 0, 128)  # half-transparent red strip -> pink
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    p = Image.new("P", (RES, RES), 1)
    p.putpalette([0, 0, 0, 12, 34, 56] + [0, 0, 0] * 254)
    p.save(d / "palette.png")
    pt = Image.new("P", (RES, RES), 0)
    pt.putpalette([0, 0, 0, 200, 0, 0] + [0, 0, 0] * 254)
    pt.paste(1, (RES // 2, 0, RES, RES))
    pt.save(d / "palette_trns.png", transparency=0)  # index 0 (black) is transparent
    grad = np.repeat(np.linspace(0, 65535, RES).round().astype(np.uint16)[None, :], RES, axis=0)
    g16 = Image.fromarray(grad)
    assert g16.mode == "I;16"
    g16.save(d / "gray16.png")
    _solid("CMYK", (255, 0, 0, 0)).save(d / "cmyk.tif")
    _solid("CMYK", (0, 255, 0, 0)).save(d / "cmyk.jpg", quality=95)
    frames = [_solid("RGB", (255, 0, 0)), _solid("RGB", (0, 0, 255))]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    _solid("RGB", (40, 50, 60)).save(d / "plain.bmp")
    if features.check("webp"):
        _solid("RGB", (70, 80, 90)).save(d / "plain.webp", lossless=True)
    return load_image_folder(d, resolution=RES)


def test_all_modes_load_as_rgb_at_size(modes_set):
    names = sorted(it.path.name for it in modes_set.items)
    expected = ["anim.gif", "bilevel.png", "cmyk.jpg", "cmyk.tif", "gray.png", "gray16.png", "la.png",
                "palette.png", "palette_trns.png", "plain.bmp", "rgb.png", "rgba.png"]
    if features.check("webp"):
        expected.append("plain.webp")
    assert names == sorted(expected)
    assert [it.path.name for it in modes_set.items] == names  # loaded in name order
    assert modes_set.skipped == []
    assert all(it.image.mode == "RGB" and it.size == (RES, RES) for it in modes_set.items)
    assert modes_set.buckets == {(RES, RES): list(range(len(names)))}


def test_simple_modes_keep_their_colours(modes_set):
    assert _px(modes_set, "rgb.png") == (10, 200, 30)
    assert _px(modes_set, "gray.png") == (100, 100, 100)
    assert _px(modes_set, "bilevel.png") == (255, 255, 255)
    assert _px(modes_set, "palette.png") == (12, 34, 56)
    assert _px(modes_set, "plain.bmp") == (40, 50, 60)
    assert _px(modes_set, "anim.gif") == (255, 0, 0)  # the first frame, not the blue second one
    if features.check("webp"):
        assert _px(modes_set, "plain.webp") == (70, 80, 90)


def test_transparency_is_composited_on_white(modes_set):
    left, right = (2, RES // 2), (RES - 2, RES // 2)
    assert _px(modes_set, "la.png", left) == (255, 255, 255)
    assert _px(modes_set, "la.png", right) == (60, 60, 60)
    assert _px(modes_set, "rgba.png", left) == (255, 255, 255)
    assert _px(modes_set, "rgba.png", right) == (255, 0, 0)
    r, g, b = _px(modes_set, "rgba.png", (RES - 2, 1))  # 50% red over white
    assert r == 255 and abs(g - 127) <= 2 and abs(b - 127) <= 2
    assert _px(modes_set, "palette_trns.png", left) == (255, 255, 255)
    assert _px(modes_set, "palette_trns.png", right) == (200, 0, 0)


def test_16bit_gray_keeps_its_full_range(modes_set):
    item = next(it for it in modes_set.items if it.path.name == "gray16.png")
    row = np.asarray(item.image)[RES // 2, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255  # scaled, not clipped to 255 everywhere
    assert np.all(np.diff(row) > 0)  # a strictly increasing ramp survives
    expected = np.rint(np.linspace(0, 65535, RES).round() / 257).astype(int)
    np.testing.assert_array_equal(row, expected)


def test_cmyk_becomes_rgb(modes_set):
    assert _px(modes_set, "cmyk.tif") == (0, 255, 255)  # cyan
    r, g, b = _px(modes_set, "cmyk.jpg")  # magenta, through JPEG
    assert r > 240 and g < 15 and b > 240


def test_exif_orientation_is_applied(tmp_path):
    stored = _halves((255, 0, 0), (0, 0, 255), size=(64, 32))  # landscape: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left side ends up on top
    stored.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    stored.save(tmp_path / "upright.jpg", quality=95)
    ds = load_image_folder(tmp_path, resolution=RES, buckets=True)
    rot, up = ds.items  # name order: rotated, upright
    assert rot.original_size == (32, 64) and up.original_size == (64, 32)
    w, h = rot.size
    assert h > w and up.size == (h, w)  # portrait bucket vs landscape bucket
    a = np.asarray(rot.image).astype(int)
    assert a[2, w // 2, 0] > 200 and a[2, w // 2, 2] < 60  # top is red
    assert a[h - 3, w // 2, 2] > 200 and a[h - 3, w // 2, 0] < 60  # bottom is blue


def test_resizes_short_side_then_center_crops(tmp_path):
    cols = np.repeat(np.arange(96, dtype=np.uint8)[None, :] * 2, 64, axis=0)
    Image.fromarray(np.stack([cols] * 3, -1)).save(tmp_path / "wide.png")  # 96x64, no resize needed
    _halves((255, 0, 0), (0, 0, 255), size=(128, 96)).save(tmp_path / "big.png")  # short side 96 -> 64
    ds = load_image_folder(tmp_path, resolution=64)
    big, wide = ds.items
    assert wide.crop_xy == (16, 0)
    np.testing.assert_array_equal(np.asarray(wide.image)[:, :, 0], cols[:, 16:80])
    assert big.size == (64, 64) and big.crop_xy == (10, 0)  # 128x96 -> 85x64, crop 10 px from left
    a = np.asarray(big.image).astype(int)
    assert a[32, 28, 0] > 200 and a[32, 36, 2] > 200  # the red/blue edge stays near the middle


def test_random_crop_is_seeded(tmp_path):
    cols = np.repeat(np.arange(256, dtype=np.uint8)[None, :], 32, axis=0)
    for k in range(4):
        Image.fromarray(np.roll(cols, 7 * k, axis=1)).save(tmp_path / f"strip{k}.png")  # 256x32 grey
    a = load_image_folder(tmp_path, resolution=32, center_crop=False, seed=1)
    b = load_image_folder(tmp_path, resolution=32, center_crop=False, seed=1)
    c = load_image_folder(tmp_path, resolution=32, center_crop=False, seed=2)
    assert [i.crop_xy for i in a.items] == [i.crop_xy for i in b.items]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a.items, b.items))
    assert [i.crop_xy for i in a.items] != [i.crop_xy for i in c.items]
    assert len({i.crop_xy for i in a.items}) > 1  # not the centre every time
    for it in a.items:
        left = it.crop_xy[0]
        assert 0 <= left <= 224 and it.crop_xy[1] == 0


# ---------------------------------------------------------------------------------------------
# skips and errors

def test_unusable_files_are_skipped_with_one_warning(tmp_path, caplog):
    _solid("RGB", (1, 2, 3), (64, 64)).save(tmp_path / "good.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "fake.png").write_bytes(np.random.default_rng(1).bytes(2000))
    (tmp_path / "notes.md").write_text("not a picture")
    _solid("RGB", (0, 0, 0), (4, 4)).save(tmp_path / "tiny.png")
    _solid("RGB", (0, 0, 0), (90, 90)).save(tmp_path / "big.png")  # 8100 px > max_pixels below
    _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)  # 10 gigapixels claimed
    (tmp_path / "sub").mkdir()
    _solid("RGB", (0, 0, 0), (64, 64)).save(tmp_path / "sub" / "nested.png")  # not searched
    with caplog.at_level(logging.WARNING, logger="studio.trainers.data"):
        ds = load_image_folder(tmp_path, resolution=64, max_pixels=8000)
    assert [it.path.name for it in ds.items] == ["good.png"]
    reasons = {p.name: why for p, why in ds.skipped}
    assert sorted(reasons) == ["big.png", "bomb.png", "fake.png", "notes.md", "tiny.png", "truncated.png"]
    assert "truncated" in reasons["truncated.png"]
    assert "not an image" in reasons["fake.png"]
    assert "not an image type" in reasons["notes.md"]
    assert "too small" in reasons["tiny.png"] and "4x4" in reasons["tiny.png"]
    assert "too large" in reasons["big.png"] and "90x90" in reasons["big.png"]
    assert "too large" in reasons["bomb.png"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert all(name in message for name in reasons)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_every_file_skipped_is_an_error_with_reasons(tmp_path):
    (tmp_path / "fake.png").write_bytes(b"hello, I am text\n" * 20)
    _solid("RGB", (0, 0, 0), (4, 4)).save(tmp_path / "tiny.png")
    with pytest.raises(StudioError) as err:
        load_image_folder(tmp_path, resolution=64)
    msg = str(err.value)
    assert "fake.png: not an image" in msg and "tiny.png: too small" in msg and str(tmp_path) in msg


@pytest.mark.parametrize("content", ["empty", "text-only", "sub-folder-only"])
def test_folder_without_images(tmp_path, content):
    if content == "text-only":
        (tmp_path / "a.txt").write_text("a caption without a picture")
        (tmp_path / "readme.md").write_text("notes")
    elif content == "sub-folder-only":
        (tmp_path / "photos").mkdir()
        _solid("RGB", (0, 0, 0), (64, 64)).save(tmp_path / "photos" / "x.png")
    with pytest.raises(StudioError, match="contains no images") as err:
        load_image_folder(tmp_path, resolution=64)
    msg = str(err.value)
    assert str(tmp_path) in msg and "png, jpg" in msg
    if content == "text-only":
        assert "a.txt" in msg and "readme.md" in msg
    if content == "sub-folder-only":
        assert "photos/" in msg and "not searched" in msg


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(StudioError, match="no such folder") as err:
        load_image_folder(tmp_path / "nope", resolution=64)
    assert "nope" in str(err.value)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(StudioError, match="not a folder") as err:
        load_image_folder(tmp_path / "file.png", resolution=64)
    assert "file.png" in str(err.value)


def test_a_wrong_folder_fails_before_the_model_is_loaded(tmp_path, monkeypatch):
    """train() says a missing or image-less folder before load_pipeline (gigabytes at real size) runs."""
    import studio.loading
    from studio.trainers.config import TrainConfig
    from studio.trainers.loop import train

    monkeypatch.setattr(studio.loading, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "notes.txt").write_text("x")
    for folder, msg in ((tmp_path / "nope", "no such folder"), (tmp_path, "contains no images")):
        cfg = TrainConfig(images=str(folder), base="micro", out=str(tmp_path / "o"))
        with pytest.raises(StudioError, match=msg):
            train(cfg)
        assert not (tmp_path / "o").exists()
    (tmp_path / "a.png").write_bytes(b"not really a png")  # decoding is load_image_folder's to judge
    from studio.trainers.data import precheck_image_folder

    precheck_image_folder(tmp_path)


@pytest.mark.parametrize("resolution, multiple", [(0, 8), (-64, 8), (60, 8), (63, 8), (72, 16)])
def test_bad_resolution_names_the_flag(tmp_path, resolution, multiple):
    _solid("RGB", (0, 0, 0), (64, 64)).save(tmp_path / "a.png")
    with pytest.raises(StudioError, match="--resolution"):
        load_image_folder(tmp_path, resolution=resolution, multiple=multiple)


def test_resolution_with_other_multiple_is_accepted(tmp_path):
    _solid("RGB", (0, 0, 0), (64, 64)).save(tmp_path / "a.png")
    ds = load_image_folder(tmp_path, resolution=48, multiple=16)
    assert ds.items[0].size == (48, 48)


# ---------------------------------------------------------------------------------------------
# captions

@pytest.fixture
def caption_dir(tmp_path) -> Path:
    for name in ["a", "b", "c", "d", "e"]:
        _solid("RGB", (0, 0, 0), (64, 64)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("  a photo of\n\n  sks   dog \t")
    (tmp_path / "b.txt").write_text("   \n")  # empty after stripping: missing
    (tmp_path / "c.caption").write_text("fallback caption")
    (tmp_path / "d.tags").write_text("tagged")
    return tmp_path  # e has no caption at all


def test_captions_are_read_stripped_and_collapsed(caption_dir):
    ds = load_image_folder(caption_dir, resolution=64)
    got = {it.path.name: it.caption for it in ds.items}
    assert got == {"a.png": "a photo of sks dog", "b.png": None, "c.png": "fallback caption",
                   "d.png": None, "e.png": None}
    # .txt and .caption files are captions; any other non-image is reported
    assert [(p.name, "not an image type" in why) for p, why in ds.skipped] == [("d.tags", True)]


def test_caption_extension_is_configurable(caption_dir):
    ds = load_image_folder(caption_dir, resolution=64, caption_ext=".tags")
    got = {it.path.name: it.caption for it in ds.items}
    assert got["d.png"] == "tagged" and got["a.png"] is None and got["c.png"] == "fallback caption"
    assert [p.name for p, _ in ds.skipped] == ["a.txt", "b.txt"]  # .txt is now just another file
    with pytest.raises(StudioError, match="--caption-ext"):
        load_image_folder(caption_dir, resolution=64, caption_ext="txt")


def test_required_captions_list_the_images_without_one(caption_dir):
    with pytest.raises(StudioError) as err:
        load_image_folder(caption_dir, resolution=64, require_captions=True)
    msg = str(err.value)
    assert "3 of 5 images have no caption" in msg
    assert "b.png" in msg and "d.png" in msg and "e.png" in msg
    assert "a.png" not in msg and "c.png" not in msg


# ---------------------------------------------------------------------------------------------
# buckets

def test_make_buckets_shape():
    for res, mult in [(64, 8), (512, 8), (1024, 64)]:
        sizes = make_buckets(res, mult)
        assert (res, res) in sizes
        assert set(sizes) == {(h, w) for w, h in sizes}  # every landscape size has its portrait twin
        for w, h in sizes:
            assert w % mult == 0 and h % mult == 0
            assert w * h <= res * res and w * h >= 0.8 * res * res
            assert max(w, h) / min(w, h) <= 2.0
        assert max(w / h for w, h in sizes) > 1.5  # wide buckets exist, not only the square


def test_nearest_bucket_by_aspect():
    sizes = make_buckets(64)
    assert sizes == [(48, 80), (56, 72), (64, 64), (72, 56), (80, 48)]
    assert nearest_bucket((128, 64), sizes) == (80, 48)
    assert nearest_bucket((64, 128), sizes) == (48, 80)
    assert nearest_bucket((100, 100), sizes) == (64, 64)
    assert nearest_bucket((1300, 1000), sizes) == (72, 56)
    assert nearest_bucket((400, 50), sizes) == (80, 48)  # beyond 2:1 goes to the widest


@pytest.fixture
def bucket_set(tmp_path) -> ImageSet:
    specs = {"land1": (128, 64), "land2": (130, 70), "land3": (200, 100), "port1": (64, 128),
             "port2": (60, 120), "square": (70, 70), "wide": (90, 70)}
    rng = np.random.default_rng(0)
    for name, (w, h) in specs.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    return load_image_folder(tmp_path, resolution=64, buckets=True)


def test_images_go_to_their_buckets(bucket_set):
    got = {it.path.name: it.size for it in bucket_set.items}
    assert got == {"land1.png": (80, 48), "land2.png": (80, 48), "land3.png": (80, 48),
                   "port1.png": (48, 80), "port2.png": (48, 80), "square.png": (64, 64),
                   "wide.png": (72, 56)}
    assert bucket_set.buckets == {(48, 80): [3, 4], (64, 64): [5], (72, 56): [6], (80, 48): [0, 1, 2]}


def test_no_buckets_means_one_square_bucket(tmp_path):
    _halves((0, 0, 0), (255, 255, 255), size=(128, 64)).save(tmp_path / "l.png")
    _halves((0, 0, 0), (255, 255, 255), size=(64, 128)).save(tmp_path / "p.png")
    ds = load_image_folder(tmp_path, resolution=64, buckets=False)
    assert ds.buckets == {(64, 64): [0, 1]} and all(it.size == (64, 64) for it in ds.items)


# ---------------------------------------------------------------------------------------------
# tensors and batches

def test_pixel_tensor_range_and_flip(bucket_set):
    t = bucket_set.pixel_tensor(0)
    assert t.dtype == torch.float32 and t.shape == (3, 48, 80)
    assert -1.0 <= t.min() < -0.9 and 0.9 < t.max() <= 1.0
    expected = torch.from_numpy(np.asarray(bucket_set.items[0].image).astype(np.float32)).permute(2, 0, 1)
    torch.testing.assert_close(t, expected / 127.5 - 1)
    f = bucket_set.pixel_tensor(0, flip=True)
    torch.testing.assert_close(f, t.flip(-1))
    assert not torch.equal(f, t)


def _take(ds: ImageSet, n: int, **kw):
    it = ds.batches(**kw)
    return [next(it) for _ in range(n)]


def test_batches_are_deterministic_for_a_seed(bucket_set):
    a = _take(bucket_set, 12, batch_size=2, seed=7)
    b = _take(bucket_set, 12, batch_size=2, seed=7)
    c = _take(bucket_set, 12, batch_size=2, seed=8)
    for (ia, ta, fa), (ib, tb, fb) in zip(a, b):
        assert ia == ib and fa == fb and torch.equal(ta, tb)
    assert [(i, f) for i, _, f in a] != [(i, f) for i, _, f in c]


def test_each_batch_is_one_bucket_and_an_epoch_sees_every_image(bucket_set):
    of = {i: size for size, idx in bucket_set.buckets.items() for i in idx}
    per_epoch = sum(-(-len(idx) // 2) for idx in bucket_set.buckets.values())  # 1+1+1+2 = 5
    batches = _take(bucket_set, 3 * per_epoch, batch_size=2, seed=3)
    for idx, pixels, flips in batches:
        assert len(idx) == 2 and len(flips) == 2  # short buckets are padded to full batches
        (w, h), = {of[i] for i in idx}
        assert pixels.shape == (2, 3, h, w)
        for k, (i, f) in enumerate(zip(idx, flips)):
            torch.testing.assert_close(pixels[k], bucket_set.pixel_tensor(i, f))
    for e in range(3):
        seen = {i for idx, _, _ in batches[e * per_epoch:(e + 1) * per_epoch] for i in idx}
        assert seen == set(range(len(bucket_set)))


def test_flips_follow_the_probability(bucket_set):
    none = _take(bucket_set, 10, batch_size=2, seed=1, flip_prob=0.0)
    every = _take(bucket_set, 10, batch_size=2, seed=1, flip_prob=1.0)
    assert not any(f for _, _, fl in none for f in fl) and all(f for _, _, fl in every for f in fl)
    for (i0, t0, _), (i1, t1, _) in zip(none, every):
        assert i0 == i1  # the flip draw does not change the order
        torch.testing.assert_close(t1, t0.flip(-1))
        assert not torch.equal(t1, t0)
    half = [f for _, _, fl in _take(bucket_set, 40, batch_size=2, seed=1) for f in fl]
    assert 20 < sum(half) < 60


def test_batches_unpadded_and_skip(bucket_set):
    sizes = {len(i) for i, _, _ in _take(bucket_set, 10, batch_size=2, seed=0, pad=False)}
    assert sizes == {1, 2}
    full = _take(bucket_set, 6, batch_size=2, seed=5)
    resumed = _take(bucket_set, 2, batch_size=2, seed=5, skip=4)
    for (ia, ta, fa), (ib, tb, fb) in zip(full[4:], resumed):
        assert ia == ib and fa == fb and torch.equal(ta, tb)


@pytest.mark.parametrize("kw, flag", [({"batch_size": 0, "seed": 0}, "--batch-size"),
                                      ({"batch_size": 2, "seed": 0, "flip_prob": 1.5}, "flip")])
def test_bad_batch_arguments(bucket_set, kw, flag):
    with pytest.raises(StudioError, match=flag):
        next(bucket_set.batches(**kw))


# ---------------------------------------------------------------------------------------------
# output folder

def test_validate_output_dir_creates_and_rejects(tmp_path, monkeypatch):
    out = validate_output_dir(tmp_path / "runs" / "one")
    assert out.is_dir() and list(out.iterdir()) == []  # the write probe left nothing behind
    (tmp_path / "taken").write_text("x")
    with pytest.raises(StudioError, match=r"--out .*taken.*is a file"):
        validate_output_dir(tmp_path / "taken")
    with pytest.raises(StudioError, match=r"--out .*taken.*cannot create"):
        validate_output_dir(tmp_path / "taken" / "below")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(data_mod.tempfile, "mkstemp", refuse)
    with pytest.raises(StudioError, match=r"--out .*one.*not writable"):
        validate_output_dir(out)


def test_large_jpeg_decoded_at_reduced_size_keeps_geometry(tmp_path):
    # 512x256 at resolution 64 is decoded at 1/4 size (JPEG draft) before the exact resize
    stored = _halves((255, 0, 0), (0, 0, 255), size=(512, 256))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "big_rotated.jpg", exif=exif.tobytes(), quality=95)
    item = load_image_folder(tmp_path, resolution=64, buckets=True).items[0]
    assert item.original_size == (256, 512) and item.size == (48, 80)
    a = np.asarray(item.image).astype(int)
    assert a[5, 24, 0] > 200 and a[5, 24, 2] < 60 and a[74, 24, 2] > 200 and a[74, 24, 0] < 60
