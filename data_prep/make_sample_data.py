"""Build the bundled sample data (assets/sample) from photos that scikit-image ships in its wheel.

    python -m data_prep.make_sample_data --out assets/sample

Deterministic and idempotent: the same inputs give byte-identical jsonl files and shard, and running it
again overwrites the same files. No network: only images present in ``skimage/data`` of the installed
wheel are used (no pooch downloads). Writes, under --out:

* ``images/<name>.jpg``      10 real photos, RGB, longer side 320 px, JPEG quality 90
* ``images/edits/*.jpg``     edited versions made with real transforms (flip, zoom, greyscale, ...)
* ``images/corrupt.jpg``     a truncated JPEG (first 40% of ``astronaut.jpg``'s bytes) -- bad on purpose
* ``captions.jsonl``         image + caption documents (+ 1 corrupt, 1 missing image)
* ``images_only.jsonl``      image-only documents (+ 1 corrupt, 1 missing image)
* ``edit.jsonl``             edit triplets (user: image + instruction, assistant: generated image)
* ``shards/captions-000000.tar``  the good caption records as a webdataset shard (+ 1 corrupt jpg member)
* ``README.md``              what is there and which entries are bad
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

MAX_SIDE = 320
JPEG_QUALITY = 90
CORRUPT_FRACTION = 0.4
CAPTION_SOURCE = "sample_captions"
IMAGES_SOURCE = "sample_images"
EDIT_SOURCE = "sample_edit"
SHARD_NAME = "shards/captions-000000.tar"
SHARD_MTIME = 0  # fixed tar member mtime -> reproducible shard bytes

# name -> (file in skimage/data, skimage.data loader, caption written by looking at the photo)
PHOTOS: dict[str, tuple[str, str, str]] = {
    "astronaut": (
        "astronaut.png", "astronaut",
        ("Portrait of a smiling astronaut with short light-brown hair in an orange spacesuit, posing in "
         "front of an American flag and a model of the space shuttle, with a helmet with a dark visor in "
         "the lower right corner.")),
    "camera": (
        "camera.png", "camera",
        ("Black-and-white photo of a man in a dark coat looking through a camera mounted on a tripod, "
         "standing on a grassy field with buildings on the horizon behind him.")),
    "chelsea": (
        "chelsea.png", "chelsea",
        ("Close-up of the face of a tabby cat with yellow-green eyes and a pink nose, looking off to "
         "the left.")),
    "coffee": (
        "coffee.png", "coffee",
        ("A cup of espresso with a layer of crema in a red-brown cup on a matching saucer, with a metal "
         "spoon, on a wooden table.")),
    "coins": (
        "coins.png", "coins",
        "Black-and-white photo of twenty-four ancient coins laid out in four rows on a dark background."),
    "rocket": (
        "rocket.jpg", "rocket",
        ("A white rocket standing on its launch pad between tall lattice towers at dusk, under a deep blue "
         "sky, with bright lights glowing around its base.")),
    "motorcycle": (
        "motorcycle_left.png", "stereo_motorcycle",
        ("A red Yamaha motorcycle with a black seat parked on the concrete floor of a garage, in front of "
         "metal shelves with cardboard boxes and a wooden bench.")),
    "hubble": (
        "hubble_deep_field.jpg", "hubble_deep_field",
        ("A deep-space telescope image of thousands of distant galaxies of many shapes and colours "
         "scattered across a black sky.")),
    "page": (
        "page.png", "page",
        ("Photo of a printed book page headed 'Region-based segmentation', with a paragraph about "
         "finding markers for coins and background, and a line of Python code below it.")),
    "retina": (
        "retina.jpg", "retina",
        ("A fundus photograph of a human retina: an orange-red disc with branching blood vessels that "
         "spread from the bright optic disc on the left, and the darker macula in the centre.")),
}

# Order of records in captions.jsonl / images_only.jsonl / the shard; "corrupt" and "missing" are the
# deliberately bad entries (they sit mid-file so loaders are exercised mid-stream).
ORDER = ["astronaut", "camera", "chelsea", "corrupt", "coffee", "coins", "rocket", "motorcycle", "missing",
         "hubble", "page", "retina"]
BAD_TEXT = {
    "corrupt": "A record whose image is a truncated JPEG; loaders must skip it as corrupt_image.",
    "missing": "A record whose image file does not exist; loaders must skip it as missing_file.",
}


def _zoom_centre(im: Image.Image, factor: float = 2.0) -> Image.Image:
    w, h = im.size
    cw, ch = round(w / factor), round(h / factor)
    left, top = (w - cw) // 2, (h - ch) // 2
    return im.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.LANCZOS)


def _red_to_blue(im: Image.Image) -> Image.Image:
    """Rotate the hue of strongly red regions (hue within ~14/256 of red, saturated) to blue."""
    hsv = np.asarray(im.convert("HSV")).astype(np.int32)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    dist = np.minimum(h, 256 - h)
    seed = Image.fromarray((((dist < 10) & (s > 140) & (v > 40)) * 255).astype(np.uint8))
    grown = np.asarray(seed.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(5))) > 0
    mask = grown & (dist < 14) & (s > 90)
    hsv[..., 0] = np.where(mask, (h + 160) % 256, h)
    return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")


# (source photo, edit name, instruction, transform)
EDITS: list[tuple[str, str, str, Callable[[Image.Image], Image.Image]]] = [
    ("chelsea", "flip", "Flip the photo horizontally.",
     lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
    ("coffee", "greyscale", "Make the photo black and white.",
     lambda im: im.convert("L").convert("RGB")),
    ("astronaut", "zoom", "Zoom in 2x on the centre of the photo.", _zoom_centre),
    ("rocket", "brighter", "Make the photo brighter.",
     lambda im: ImageEnhance.Brightness(im).enhance(1.6)),
    ("motorcycle", "red_to_blue", "Change the colour of the red motorcycle and the other red objects to blue.",
     _red_to_blue),
    ("coins", "rotate", "Rotate the photo 90 degrees clockwise.",
     lambda im: im.transpose(Image.Transpose.ROTATE_270)),
    ("camera", "blur", "Blur the whole photo.",
     lambda im: im.filter(ImageFilter.GaussianBlur(radius=3))),
    ("retina", "darker", "Make the photo darker.",
     lambda im: ImageEnhance.Brightness(im).enhance(0.55)),
]


def load_photo(name: str, max_side: int | None = MAX_SIDE) -> Image.Image:
    """One bundled photo, shrunk to `max_side` (None: its own size, as src.bench's full-res data trial uses)."""
    import skimage
    import skimage.data

    filename, loader, _ = PHOTOS[name]
    data_dir = Path(skimage.data.__file__).parent
    if not (data_dir / filename).is_file():  # would need a pooch download: refuse, we work offline
        raise FileNotFoundError(f"skimage {skimage.__version__} does not ship {filename} in {data_dir}; "
                                f"the sample data needs scikit-image's bundled images (no downloads)")
    arr = getattr(skimage.data, loader)()
    if loader == "stereo_motorcycle":
        arr = arr[0]  # (left, right, disparity)
    im = Image.fromarray(np.asarray(arr)).convert("RGB")
    w, h = im.size
    scale = (max_side or max(w, h)) / max(w, h)
    if scale < 1:
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    return im


def jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    _write_bytes(path, text.encode("utf-8"))


def _caption_record(name: str, image: str) -> dict:
    text = BAD_TEXT.get(name) or PHOTOS[name][2]
    return {"id": f"{CAPTION_SOURCE}/{name}", "source": CAPTION_SOURCE,
            "turns": [{"role": None, "content": [{"image": image}, {"text": text}]}]}


def _image_path(name: str) -> str:
    return f"images/{name}.jpg"  # images/corrupt.jpg exists (truncated); images/missing.jpg never does


def _readme(summary: dict) -> str:
    bad_lines = {n: ORDER.index(n) + 1 for n in ("corrupt", "missing")}
    photo_lines = "\n".join(f"| `images/{n}.jpg` | `skimage.data.{PHOTOS[n][1]}()` |" for n in PHOTOS)
    edit_lines = "\n".join(f"| `{EDIT_SOURCE}/{src}_{ename}` | `images/{src}.jpg` | `images/edits/{src}_{ename}.jpg` "
                           f"| {instr} |" for src, ename, instr, _ in EDITS)
    return f"""# Bundled sample data

Made by `python -m data_prep.make_sample_data --out assets/sample` (deterministic; do not edit by hand).
Every record follows the schema in `src/data/records.py`; image paths are relative to this folder.
The photos come from scikit-image's bundled `skimage.data` images (see scikit-image's documentation for
each image's origin and licence), converted to RGB, longer side {MAX_SIDE} px, JPEG quality {JPEG_QUALITY}.

| photo | from |
|---|---|
{photo_lines}

## Files and expected counts

| file | records | good | bad (deliberate) |
|---|---|---|---|
| `captions.jsonl` | {summary['captions']} | {len(PHOTOS)} | 2: line {bad_lines['corrupt']} `{CAPTION_SOURCE}/corrupt` -> `images/corrupt.jpg` (**corrupt_image**), line {bad_lines['missing']} `{CAPTION_SOURCE}/missing` -> `images/missing.jpg` (**missing_file**) |
| `images_only.jsonl` | {summary['images_only']} | {len(PHOTOS)} | 2: line {bad_lines['corrupt']} `{IMAGES_SOURCE}/corrupt` (**corrupt_image**), line {bad_lines['missing']} `{IMAGES_SOURCE}/missing` (**missing_file**) |
| `edit.jsonl` | {summary['edit']} | {summary['edit']} | none |
| `{SHARD_NAME}` | {summary['shard']} samples | {len(PHOTOS)} | 1: key `corrupt` (its `corrupt.jpg` member is truncated -> **corrupt_image**) |

All lines of the jsonl files are schema-valid: `read_jsonl` yields every record (no `SkippedSample`); the
bad ones fail in `load_image`. `read_shards` (which decodes images by default) yields the {len(PHOTOS)} good
records and one `SkippedSample(reason="corrupt_image")`.

- `images/corrupt.jpg`: the first {int(CORRUPT_FRACTION * 100)}% of the bytes of `images/astronaut.jpg` (a truncated JPEG: the
  header parses, full decoding fails).
- `images/missing.jpg`: deliberately absent.
- Shard layout: `<key>.json` (the record, its image item is `{{"image": "jpg"}}`) + `<key>.jpg`; keys are
  the photo names. Caption records in the shard are the same as in `captions.jsonl` except for the image
  reference.

## Edit triplets (`edit.jsonl`)

User turn: `[{{"image": source}}, {{"text": instruction}}]`; assistant turn: `[{{"image": target, "generate": true}}]`.
Targets are real transforms of the source photo:

| id | source | target | instruction |
|---|---|---|---|
{edit_lines}
"""


def build_sample_data(out: str | Path) -> dict:
    """Write the sample data under ``out``; returns a summary (record counts, files, bytes)."""
    import webdataset as wds

    out = Path(out)
    photos = {name: load_photo(name) for name in PHOTOS}
    jpegs = {name: jpeg_bytes(im) for name, im in photos.items()}
    corrupt = jpegs["astronaut"][: int(len(jpegs["astronaut"]) * CORRUPT_FRACTION)]
    for name, data in jpegs.items():
        _write_bytes(out / _image_path(name), data)
    _write_bytes(out / _image_path("corrupt"), corrupt)

    captions = [_caption_record(name, _image_path(name)) for name in ORDER]
    images_only = [{"id": f"{IMAGES_SOURCE}/{name}", "source": IMAGES_SOURCE,
                    "turns": [{"role": None, "content": [{"image": _image_path(name)}]}]} for name in ORDER]
    _write_jsonl(out / "captions.jsonl", captions)
    _write_jsonl(out / "images_only.jsonl", images_only)

    edits = []
    for src, ename, instruction, transform in EDITS:
        target = f"images/edits/{src}_{ename}.jpg"
        _write_bytes(out / target, jpeg_bytes(transform(photos[src])))
        edits.append({"id": f"{EDIT_SOURCE}/{src}_{ename}", "source": EDIT_SOURCE, "turns": [
            {"role": "user", "content": [{"image": _image_path(src)}, {"text": instruction}]},
            {"role": "assistant", "content": [{"image": target, "generate": True}]}]})
    _write_jsonl(out / "edit.jsonl", edits)

    shard_path = out / SHARD_NAME
    shard_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = shard_path.with_name(shard_path.name + ".tmp")
    n_shard = 0
    with wds.TarWriter(str(tmp), encoder=False, mtime=SHARD_MTIME, user="seedx", group="seedx") as sink:
        for name in ORDER:
            if name == "missing":
                continue
            record = _caption_record(name, "jpg")
            sink.write({"__key__": name, "jpg": jpegs.get(name, corrupt),
                        "json": json.dumps(record, ensure_ascii=False).encode("utf-8")})
            n_shard += 1
    tmp.replace(shard_path)

    summary = {"captions": len(captions), "images_only": len(images_only), "edit": len(edits),
               "shard": n_shard}
    _write_bytes(out / "README.md", _readme(summary).encode("utf-8"))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    summary["files"] = files
    summary["bytes"] = sum((out / f).stat().st_size for f in files)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="assets/sample", help="output folder (default: assets/sample)")
    args = parser.parse_args(argv)
    summary = build_sample_data(args.out)
    print(f"sample data in {args.out}: {len(summary['files'])} files, {summary['bytes'] / 1e6:.2f} MB")
    print(f"  captions.jsonl     {summary['captions']} records ({len(PHOTOS)} good, 1 corrupt image, 1 missing)")
    print(f"  images_only.jsonl  {summary['images_only']} records ({len(PHOTOS)} good, 1 corrupt image, 1 missing)")
    print(f"  edit.jsonl         {summary['edit']} edit triplets (all good)")
    print(f"  {SHARD_NAME}  {summary['shard']} samples ({len(PHOTOS)} good, 1 corrupt jpg member)")
    return summary


if __name__ == "__main__":
    main()
