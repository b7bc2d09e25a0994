"""Training images: a folder of pictures with optional captions, ready for the training loop.

``load_image_folder(folder, resolution=...)`` reads the *top level* of ``folder`` (sub-folders
are not searched), in file-name order, and returns an :class:`ImageSet` whose images are
already converted to RGB, EXIF-rotated, resized and cropped to their bucket size. A caption is
the text file ``NAME<caption_ext>`` beside ``NAME.png`` (``NAME.caption`` as a fallback).

Unusable files (not an image, corrupt or truncated, too small, too large) are skipped, listed in
one warning and kept in :attr:`ImageSet.skipped`; the user's mistakes that leave nothing to train
on raise a :class:`~studio.errors.StudioError` naming the folder or file and the fix.

``ImageSet.batches(batch_size, seed)`` is the loop's stream: infinite, deterministic for a seed,
every batch from one bucket (one image size), random horizontal flips.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import tempfile
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from studio.errors import StudioError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FALLBACK_CAPTION_EXT = ".caption"
DEFAULT_MAX_PIXELS = 64_000_000
MAX_ASPECT = 2.0
_TYPES = "png, jpg, jpeg, webp, bmp, gif, tif, tiff"
_SHOWN = 5  # how many files an error message lists before "and N more"
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")  # La has no conversion in PIL: skipped
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


@dataclass
class ImageItem:
    """One training image: its file, the RGB picture at bucket size, and its caption."""

    path: Path
    image: Image.Image  # RGB, already resized and cropped to the bucket size
    caption: str | None
    original_size: tuple[int, int]  # (w, h) of the file after EXIF rotation, before resizing
    crop_xy: tuple[int, int] = (0, 0)  # (left, top) of the crop in the resized picture;
    # SDXL's crops_coords_top_left is (top, left) = (crop_xy[1], crop_xy[0])

    @property
    def size(self) -> tuple[int, int]:
        """(w, h) of the prepared image, i.e. of its bucket."""
        return self.image.size

    def sdxl_time_ids(self, flip: bool = False) -> tuple[int, int, int, int, int, int]:
        """SDXL's added conditions: original (h, w), crop top-left (top, left), target (h, w).

        A mirrored image's crop is measured from the other edge of the resized picture (as kohya's
        sd-scripts do); the resized width is recomputed the way :func:`_fit` computed it.
        """
        ow, oh = self.original_size
        tw, th = self.size
        left, top = self.crop_xy
        if flip:
            left = max(0, max(tw, round(ow * max(tw / ow, th / oh))) - tw - left)
        return (oh, ow, top, left, th, tw)


@dataclass
class ImageSet:
    """The usable images of a folder, the files skipped (and why), and the size buckets."""

    folder: Path
    resolution: int
    items: list[ImageItem]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    buckets: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # (w, h) -> indices

    def __len__(self) -> int:
        return len(self.items)

    def pixel_tensor(self, i: int, flip: bool = False) -> torch.Tensor:
        """Image ``i`` as float32 CHW in [-1, 1], mirrored left-right when ``flip``."""
        arr = np.asarray(self.items[i].image, dtype=np.float32)  # HWC, 0..255
        if flip:
            arr = arr[:, ::-1]
        chw = np.ascontiguousarray(arr.transpose(2, 0, 1))
        return torch.from_numpy(chw) / 127.5 - 1.0

    def batches(
        self, batch_size: int, seed: int, flip_prob: float = 0.5, *, pad: bool = True, skip: int = 0
    ) -> Iterator[tuple[list[int], torch.Tensor, list[bool]]]:
        """Yield ``(indices, pixels NCHW, flips)`` forever; the same seed gives the same stream.

        Each epoch shuffles every bucket, cuts it into batches and shuffles the batches, so every
        image is seen once per epoch and a batch never mixes sizes. With ``pad`` (the default) a
        bucket's last, short batch is filled with other images of that bucket (repeats when the
        bucket holds fewer than ``batch_size``), so every batch has ``batch_size`` images;
        ``pad=False`` yields it short. ``skip`` drops the first batches without building them
        (to resume a run exactly where it stopped).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise StudioError(f"--batch-size {batch_size}: must be a whole number of at least 1")
        if not 0.0 <= flip_prob <= 1.0:
            raise StudioError(f"flip probability {flip_prob}: must be between 0 and 1")
        if not self.items:
            raise StudioError(f"{self.folder}: the image set is empty; nothing to make batches of")
        rng = np.random.default_rng(seed)
        keys = sorted(self.buckets)
        produced = 0
        while True:
            plan: list[list[int]] = []
            for key in keys:
                perm = [int(i) for i in rng.permutation(self.buckets[key])]
                for start in range(0, len(perm), batch_size):
                    chunk = perm[start:start + batch_size]
                    need = batch_size - len(chunk)
                    if need and pad:
                        pool = [i for i in perm if i not in chunk]
                        if len(pool) >= need:
                            chunk += [int(i) for i in rng.choice(pool, need, replace=False)]
                        else:  # the bucket is smaller than a batch: repeat its images
                            chunk += [int(i) for i in rng.choice(perm, need, replace=True)]
                    plan.append(chunk)
            for j in rng.permutation(len(plan)):
                idx = plan[int(j)]
                flips = [bool(f) for f in rng.random(len(idx)) < flip_prob]
                produced += 1
                if produced <= skip:
                    continue
                pixels = torch.stack([self.pixel_tensor(i, f) for i, f in zip(idx, flips)])
                yield idx, pixels, flips


def make_buckets(resolution: int, multiple: int = 8, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """Kohya-style bucket sizes (w, h): multiples of ``multiple``, about resolution**2 pixels
    (never more), aspect at most ``max_aspect``; landscape sizes and their portrait mirrors."""
    _check_resolution(resolution, multiple)
    area = resolution * resolution
    sizes: set[tuple[int, int]] = set()
    w = resolution
    while True:
        h = (area // w) // multiple * multiple
        if h < multiple or w / h > max_aspect:
            break
        sizes.update({(w, h), (h, w)})
        w += multiple
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``size``'s (compared as log ratios)."""
    target = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1], b))


def load_image_folder(
    folder: str | os.PathLike[str],
    resolution: int = 512,
    center_crop: bool = True,
    buckets: bool = False,
    caption_ext: str = ".txt",
    require_captions: bool = False,
    *,
    multiple: int = 8,
    min_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    seed: int = 0,
) -> ImageSet:
    """Read the images at the top level of ``folder`` (sub-folders are not searched).

    Files are taken in name order; images become RGB (transparency composited on white, 16-bit
    grey scaled to 8 bits, CMYK converted, EXIF orientation applied), are resized so their short
    side fits the target and cropped (centre, or a random crop seeded by ``seed`` and the file
    name). Without ``buckets`` every image is ``resolution`` x ``resolution``; with ``buckets``
    each goes to the aspect-ratio bucket nearest its own (see :func:`make_buckets`).
    Files shorter than ``min_size`` (default ``resolution // 2``) or larger than ``max_pixels``
    are skipped, like files that are not images or do not decode.
    """
    _check_resolution(resolution, multiple)
    if min_size is None:
        min_size = resolution // 2
    if min_size < 1:
        raise StudioError(f"--min-size {min_size}: must be at least 1 pixel")
    if max_pixels < 1:
        raise StudioError(f"max_pixels {max_pixels}: must be a positive number of pixels")
    if not caption_ext.startswith(".") or len(caption_ext) < 2:
        raise StudioError(f"--caption-ext {caption_ext!r}: must be a file extension with its dot, e.g. .txt")
    caption_exts = tuple(dict.fromkeys((caption_ext.lower(), FALLBACK_CAPTION_EXT)))

    root = Path(folder)
    files, subdirs, others, captions = _list_folder(root, caption_exts)
    images = _images_or_raise(root, files, subdirs, others, captions)

    sizes = make_buckets(resolution, multiple) if buckets else [(resolution, resolution)]
    skipped: list[tuple[Path, str]] = [
        (p, f"not an image type ({_TYPES})") for p in files if p.suffix.lower() not in IMAGE_SUFFIXES
    ]
    skipped += [(p, "not a regular file (a broken link?)") for p in others]
    items: list[ImageItem] = []
    bad_captions: list[str] = []
    for path in images:
        try:
            image, original, crop = _prepare(path, sizes, center_crop, min_size, max_pixels, seed)
        except _Skip as exc:
            skipped.append((path, str(exc)))
            continue
        caption = _read_caption(path, caption_exts, captions, bad_captions)
        items.append(ImageItem(path=path, image=image, caption=caption, original_size=original, crop_xy=crop))
    if bad_captions:
        raise StudioError(f"caption files that are not UTF-8 text: {_some(bad_captions)}; "
                          f"re-save them as UTF-8")
    skipped.sort(key=lambda s: s[0].name)

    if not items:
        reasons = [f"{p.name}: {why}" for p, why in skipped]
        raise StudioError(f"{root}: no usable images, every file was skipped ({_some(reasons, sep='; ')}); "
                          f"add {_TYPES} images of at least {min_size} px on the shorter side")
    if skipped:
        lines = "\n".join(f"  {p.name}: {why}" for p, why in skipped)
        log.warning("%s: skipped %d of %d files:\n%s", root, len(skipped), len(skipped) + len(items), lines)

    missing = [it.path.name for it in items if it.caption is None]
    if missing and require_captions:
        raise StudioError(
            f"{root}: {len(missing)} of {len(items)} images have no caption "
            f"(NAME{caption_exts[0]} beside NAME.png is missing or empty): {_some(missing, shown=20)}; "
            f"write a caption file for each, or train without requiring captions")
    if missing:
        log.info("%s: %d of %d images have no caption", root, len(missing), len(items))

    groups: dict[tuple[int, int], list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.size, []).append(i)
    return ImageSet(folder=root, resolution=resolution, items=items, skipped=skipped,
                    buckets=dict(sorted(groups.items())))


def validate_output_dir(path: str | os.PathLike[str]) -> Path:
    """Create the output folder if needed and check that files can be written in it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise StudioError(f"--out {out}: is a file, not a folder; choose a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudioError(f"--out {out}: cannot create the output folder ({exc.strerror or exc}); "
                          f"choose another") from exc
    try:  # a real write, because os.access says yes to root on read-only mounts
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StudioError(f"--out {out}: the output folder is not writable ({exc.strerror or exc}); "
                          f"choose another") from exc
    return out


class _Skip(Exception):
    """A file that cannot be used; the message is the reason shown to the user."""


def _check_resolution(resolution: int, multiple: int) -> None:
    if not isinstance(multiple, numbers.Integral) or isinstance(multiple, bool) or multiple < 1:
        raise StudioError(f"multiple {multiple!r}: the size step must be a whole number of at least 1")
    if not isinstance(resolution, numbers.Integral) or isinstance(resolution, bool) or resolution <= 0:
        raise StudioError(f"--resolution {resolution!r}: must be a positive number of pixels, e.g. 512")
    if resolution % multiple:
        lower = resolution // multiple * multiple
        raise StudioError(f"--resolution {resolution}: must be a multiple of {multiple}; "
                          f"use {lower or multiple} or {lower + multiple}")


def _some(names: Sequence[str], shown: int = _SHOWN, sep: str = ", ") -> str:
    """The first ``shown`` names joined, with "and N more" for the rest."""
    text = sep.join(names[:shown])
    return text + (f"{sep}and {len(names) - shown} more" if len(names) > shown else "")


def precheck_image_folder(folder: str | os.PathLike[str], caption_ext: str = ".txt") -> None:
    """Fail at once on a missing folder or one without image files (before a model is loaded);
    whether the images decode is :func:`load_image_folder`'s to say."""
    root = Path(folder)
    caption_exts = tuple(dict.fromkeys((caption_ext.lower(), FALLBACK_CAPTION_EXT)))
    _images_or_raise(root, *_list_folder(root, caption_exts))


def _images_or_raise(root: Path, files: list[Path], subdirs: list[Path], others: list[Path],
                     captions: dict[str, Path]) -> list[Path]:
    """The files with an image suffix; a clear error when there are none."""
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        found = sorted([p.name for p in others + files] + [p.name for p in set(captions.values())])
        detail = f"found only {_some(found)}" if found else "the folder is empty"
        if subdirs:
            detail += f"; sub-folders are not searched ({_some([d.name + '/' for d in subdirs])})"
        raise StudioError(f"{root}: contains no images ({_TYPES}); {detail}")
    return images


def _list_folder(
    root: Path, caption_exts: tuple[str, ...]
) -> tuple[list[Path], list[Path], list[Path], dict[str, Path]]:
    """(files that are not captions, sub-folders, other entries, caption files by lower-case
    name) of ``root``, sorted by name. Hidden files (``.DS_Store``, ...) are ignored."""
    if not root.exists():
        raise StudioError(f"{root}: no such folder; give the folder that holds the training images")
    if not root.is_dir():
        raise StudioError(f"{root}: is a file, not a folder; give the folder that holds the training images")
    try:
        entries = sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    except OSError as exc:
        raise StudioError(f"{root}: cannot list the folder ({exc.strerror or exc}); check its permissions") from exc
    files: list[Path] = []
    subdirs: list[Path] = []
    others: list[Path] = []
    captions: dict[str, Path] = {}
    for p in entries:
        if p.is_dir():
            subdirs.append(p)
        elif not p.is_file():
            others.append(p)
        elif p.suffix.lower() in caption_exts:
            captions.setdefault(p.name.lower(), p)  # name order: "a.TXT" before "a.txt"
            if p.name.lower() == p.name:  # an exact lower-case name wins
                captions[p.name] = p
        else:
            files.append(p)
    return files, subdirs, others, captions


def _read_caption(image: Path, exts: tuple[str, ...], captions: dict[str, Path], bad: list[str]) -> str | None:
    """The image's caption, stripped and whitespace-collapsed; None when missing or empty.
    ``NAME<ext>`` is looked up for each ext in turn; the match ignores case (IMG_1.JPG may have
    IMG_1.TXT or IMG_1.txt)."""
    for ext in exts:
        name = image.stem + ext
        path = image.parent / name
        if not path.is_file():
            path = captions.get(name.lower())
            if path is None:
                continue
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            bad.append(path.name)
            return None
        except OSError as exc:
            raise StudioError(f"{path}: cannot read the caption ({exc.strerror or exc})") from exc
        text = " ".join(text.split())
        if text:  # an empty caption file counts as missing
            return text
    return None


def _prepare(
    path: Path, sizes: Sequence[tuple[int, int]], center_crop: bool, min_size: int, max_pixels: int, seed: int
) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Decode, rotate, convert, resize and crop one file; raise _Skip with the reason if unusable."""
    with warnings.catch_warnings():
        # our own max_pixels check below replaces PIL's warning; its hard limit still raises
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise _Skip(f"too large: {exc}") from None
        except UnidentifiedImageError:
            raise _Skip("not an image PIL can read (unknown format or corrupt header)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise _Skip(f"cannot open ({exc})") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise _Skip(f"too large: {w}x{h} is {w * h / 1e6:.1f} megapixels, above the limit of "
                        f"{max_pixels / 1e6:g} (max_pixels)")
        if min(w, h) < min_size:
            raise _Skip(f"too small: {w}x{h}, the shorter side is below {min_size} px (min_size)")
        try:
            orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
        except Exception:  # noqa: BLE001 - a broken EXIF block only loses the rotation
            orientation = 1
        original = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
        target = nearest_bucket(original, sizes)
        scale = max(target[0] / original[0], target[1] / original[1])
        if im.format in ("JPEG", "MPO") and scale < 0.5:  # decode at 1/2, 1/4, 1/8 size: faster
            im.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))
        try:
            im.load()  # force the full decode: truncated and corrupt files fail here
        except MemoryError:
            raise _Skip(f"too large to decode in memory ({w}x{h})") from None
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data
            raise _Skip(f"corrupt or truncated image ({exc})") from None
        try:
            rotated = ImageOps.exif_transpose(im)
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: cannot apply the EXIF orientation (%s); using the image as stored", path, exc)
            rotated = im
        try:
            rgb = _to_rgb(rotated)
        except (ValueError, OSError) as exc:
            raise _Skip(f"unsupported colour mode {rotated.mode} ({exc})") from None
    rng = np.random.default_rng([seed, zlib.crc32(path.name.encode("utf-8", "surrogateescape"))])
    image, crop = _fit(rgb, target, center_crop, rng)
    return image, original, crop


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any PIL mode: alpha over white, 16/32-bit and float grey scaled to 8 bits."""
    mode = im.mode
    if mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_to_uint8(np.asarray(im)), "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return im.copy()
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale high-bit-depth grey to 0..255 by its nominal range, never by clipping.

    Unsigned 16-bit data (and 32-bit data whose values fit in 0..65535, which is what PIL makes
    of 16-bit sources) is divided by 257; floats in [0, 1] are multiplied by 255; anything else
    is stretched from its own minimum to its maximum.
    """
    a = arr.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
        out = a / 257.0
    elif arr.dtype.kind in "iu" and lo >= 0 and hi <= 65535:
        out = a / 257.0
    elif arr.dtype.kind == "f" and lo >= 0 and hi <= 1:
        out = a * 255.0
    elif hi > lo:
        out = (a - lo) * (255.0 / (hi - lo))
    else:
        out = np.zeros_like(a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _fit(
    im: Image.Image, target: tuple[int, int], center: bool, rng: np.random.Generator
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize so ``im`` covers ``target`` (w, h), then crop it to exactly that size."""
    tw, th = target
    w, h = im.size
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if center:
        left, top = (nw - tw) // 2, (nh - th) // 2
    else:
        left, top = int(rng.integers(0, nw - tw + 1)), int(rng.integers(0, nh - th + 1))
    if (left, top, nw, nh) != (0, 0, tw, th):
        im = im.crop((left, top, left + tw, top + th))
    return im, (left, top)
