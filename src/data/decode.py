"""Image items -> pixels: :func:`load_image` finds an item's bytes (a shard member, or a path checked against
the source's roots: untrusted data), decodes it fully, applies the EXIF orientation and scales high bit
depths to 8 bits; every failure is a :class:`~src.data.skips.BadSample` with its reason."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

from src.data.schema import _str_or_none
from src.data.skips import BadSample

ORIENTATION_KEY = "exif_orientation"  # info key of load_image's result: the EXIF orientation (1-8) it undid

__all__ = ["ORIENTATION_KEY", "check_image_size", "image_bytes", "load_image"]


def _bits_per_sample(im: Image.Image) -> int:
    """Bits of full scale of a 32-bit-int (mode ``I``) image: the TIFF's BitsPerSample where it says (one
    less for signed samples, whose positive range it is), else 16 (PNG / PGM hand 16-bit samples over
    in mode ``I``)."""
    tags = getattr(im, "tag_v2", {})

    def first(tag: int):  # TIFF tags hold an int or one value per band
        value = tags.get(tag)
        return value[0] if isinstance(value, tuple) and value else value

    bits, signed = first(258), first(339) == 2  # BitsPerSample, SampleFormat (2 = signed integer)
    return max(8, int(bits) - signed) if isinstance(bits, int) and 8 <= bits <= 32 else 16


def _high_bit_to_l(im: Image.Image) -> Image.Image:
    """A single-band image deeper than 8 bits (``I;16*``, ``I``, ``F``) as 8-bit ``L``, scaled, not clipped:
    ``v >> (bits - 8)`` for integers (the top 8 bits; what PIL itself keeps of 16-bit RGB / RGBA / LA
    PNGs), ``round(255 * v)`` for floats, which are taken as [0, 1] (NaN -> 0). PIL's own ``convert``
    clips every value above 255 instead, which turns a 16-bit photo white."""
    arr = np.asarray(im)
    if im.mode == "F":
        out = np.rint(np.clip(np.nan_to_num(arr.astype(np.float64)), 0.0, 1.0) * 255.0)
    else:
        bits = 16 if im.mode.startswith("I;16") else _bits_per_sample(im)
        out = np.clip(arr.astype(np.int64), 0, (1 << bits) - 1) >> (bits - 8)
    transparent = im.info.get("transparency")  # a 16-bit grey PNG's tRNS value: those pixels onto white
    if isinstance(transparent, int):
        out = np.where(arr == transparent, 255, out)
    return Image.fromarray(out.astype(np.uint8), "L")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return _high_bit_to_l(im).convert("RGB")
    if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")  # transparent pixels onto white, not onto whatever colour they hold
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def check_image_size(w: int, h: int, name: str, min_size: int = 1, max_aspect_ratio: float | None = None,
                     **ctx) -> None:
    """``image_too_small`` / ``bad_aspect_ratio`` checks of :func:`load_image` on a known size (also used on
    the stored sizes of precomputed features, which decode no image)."""
    if min(w, h) < max(min_size, 1):
        raise BadSample("image_too_small", f"{name} is {w}x{h}, shorter side < min_size={min_size}", **ctx)
    if max_aspect_ratio is not None and max(w, h) / min(w, h) > max_aspect_ratio:
        raise BadSample("bad_aspect_ratio", f"{name} is {w}x{h}, aspect ratio "
                                            f"{max(w, h) / min(w, h):.2f} > {max_aspect_ratio}", **ctx)


def _resolve_image_path(record: dict, ref: str, ctx: dict) -> Path:
    """The real path of a (non-shard) image reference, refused when outside the record's source roots."""
    base = record.get("_base_dir")
    path = Path(ref)
    if base is None:  # not from a source reader: the caller chose the path
        return path.resolve()
    path = (Path(base) / path).resolve()  # an absolute ref replaces base; symlinks and .. are followed
    roots = [base, *(record.get("_allowed_roots") or ())]
    if not any(path.is_relative_to(Path(r).resolve()) for r in roots):
        raise BadSample("path_outside_root", f"image {ref!r} resolves to {path}, outside the source root "
                                             f"{base} and allowed_roots {roots[1:]}", **ctx)
    return path


def _image_ctx(record: dict) -> dict:
    return {"source": _str_or_none(record, "source"), "id": _str_or_none(record, "id"),
            "where": _str_or_none(record, "_where")}


def _image_source(record: dict, item: dict | str, ctx: dict) -> tuple[str, Any]:
    """(name for messages, file path or BytesIO) of an image item: a shard member or a checked path."""
    ref = item["image"] if isinstance(item, dict) else item
    blobs = record.get("_blobs")
    if blobs is not None:
        data = blobs.get(ref, blobs.get(ref.lower()))
        if data is None:
            raise BadSample("missing_file", f"no member {ref!r} in shard sample (has {sorted(blobs)})", **ctx)
        return f"member {ref!r}", io.BytesIO(data)
    path = _resolve_image_path(record, ref, ctx)
    if not path.is_file():
        raise BadSample("missing_file", f"{path} does not exist", **ctx)
    return str(path), path


def image_bytes(record: dict, item: dict | str) -> tuple[bytes, str]:
    """The stored bytes of an image item and its extension, found as :func:`load_image` finds them (shard
    member, or a path checked against the source's roots: ``missing_file`` / ``path_outside_root``);
    not decoded."""
    _, fp = _image_source(record, item, _image_ctx(record))
    if isinstance(fp, io.BytesIO):
        ref = item["image"] if isinstance(item, dict) else item
        return fp.getvalue(), ref.rsplit(".", 1)[-1]
    return fp.read_bytes(), fp.suffix.lstrip(".")


def load_image(record: dict, item: dict | str, min_size: int = 1,
               max_aspect_ratio: float | None = None) -> Image.Image:
    """Decode one image item of ``record`` to an upright RGB ``PIL.Image`` (fully decoded, file closed).

    Shard records resolve the item against ``record["_blobs"]`` (member names, not paths). Others resolve
    it against ``record["_base_dir"]`` (absolute paths as they are), then follow symlinks and ``..``; with
    a ``_base_dir`` (every record a source reader made) the result must lie inside it or one of
    ``record["_allowed_roots"]``, else ``path_outside_root``.

    The EXIF orientation is applied, and ``info[ORIENTATION_KEY]`` of the result holds the one undone
    (1 = none): boxes of the record are in the stored pixel frame, ``src.data.bbox.orient_box`` turns them
    upright with it. High-bit-depth images are scaled to 8 bits (:func:`_high_bit_to_l`); transparent
    pixels go onto white. Raises :class:`BadSample` with reason ``missing_file``, ``path_outside_root``,
    ``corrupt_image`` (undecodable or truncated), ``image_too_small`` (shorter side < ``min_size``),
    ``bad_aspect_ratio`` (long/short side > ``max_aspect_ratio``) or ``image_too_large`` (PIL
    decompression-bomb limit).
    """
    ctx = _image_ctx(record)
    name, fp = _image_source(record, item, ctx)
    try:
        with Image.open(fp) as im:
            check_image_size(*im.size, name, min_size, max_aspect_ratio, **ctx)  # orientation-invariant
            im.load()  # full decode: truncated files fail here, not later in a collate
            orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
            orientation = int(orientation) if orientation in range(1, 9) else 1  # invalid tags: as stored
            if orientation != 1:
                ImageOps.exif_transpose(im, in_place=True)
            rgb = _to_rgb(im)
        rgb.info[ORIENTATION_KEY] = orientation
        return rgb
    except BadSample:
        raise
    except Image.DecompressionBombError as e:
        raise BadSample("image_too_large", f"{name}: {e}", **ctx) from None
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise BadSample("corrupt_image", f"{name}: {type(e).__name__}: {e}", **ctx) from None
