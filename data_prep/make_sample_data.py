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
* ``sft_{chat,edit,story,ppt,tryon}.jsonl``  instruction-tuning conversations of the SEED-X-I/-Edit/-Story/
  -PPT/-Try-on tiny twins, with ``images/edits/`` chains, ``images/slides/`` and ``images/tryon/``
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

## Instruction-tuning conversations (`sft_*.jsonl`)

Chat records (`[INST] … [/INST]` turns at training time; CE on assistant turns only) for the tiny twins of
the `seedx_sft_*` experiments; every line is good.

| file | conversations | what |
|---|---|---|
| `sft_chat.jsonl` | {summary['sft_chat']} | SEED-X-I chats: images in user turns (two in one), a multi-turn chat, a box answer, a drawn image, text only |
| `sft_edit.jsonl` | {summary['sft_edit']} | SEED-X-Edit: source at a 1x1 grid, generated targets; two multi-turn chains (`images/edits/*_flip_grey.jpg`, `*_brighter_blur.jpg`) |
| `sft_story.jsonl` | {summary['sft_story']} | SEED-X-Story: one (image, sentence) step given, then sentence + generated image per turn |
| `sft_ppt.jsonl` | {summary['sft_ppt']} | SEED-X-PPT: per slide the text, a layout box on the {SLIDE_SIZE[0]}x{SLIDE_SIZE[1]} canvas and the generated picture (`images/slides/` renders) |
| `sft_tryon.jsonl` | {summary['sft_tryon']} | SEED-X-Try-on: masked person + garment crop (`images/tryon/`) -> the dressed person |
"""


# --------------------------------------------------------------------------------------------- SFT samples
# Instruction-tuning conversations (SEED-X-I, -Edit, -PPT, -Story, -Try-on tiny twins), written by looking at
# the photos. Boxes are in pixels of the 320-px photos.
SFT_CHATS: list[tuple[str, list[tuple[str, list]]]] = [
    ("chelsea_animal", [("user", [("image", "chelsea"), ("text", "What animal is this?")]),
                        ("assistant", [("text", "A tabby cat with yellow-green eyes.")]),
                        ("user", [("text", "Which way is it looking?")]),
                        ("assistant", [("text", "To the left of the camera.")])]),
    ("coffee_drink", [("user", [("text", "What is in the cup?"), ("image", "coffee")]),
                      ("assistant", [("text", "An espresso with crema, on a saucer with a spoon.")])]),
    ("astronaut_helmet", [("user", [("image", "astronaut"), ("text", "Where is the helmet?")]),
                          ("assistant", [("text", "In the lower right corner"), ("box", [228, 214, 320, 320]),
                                         ("text", ".")])]),
    ("two_photos", [("user", [("image", "rocket"), ("image", "hubble"),
                              ("text", "What do these two photos have in common?")]),
                    ("assistant", [("text", ("Both are about space: a rocket on its launch pad and a telescope "
                                             "image of distant galaxies."))])]),
    ("page_heading", [("user", [("image", "page"), ("text", "What is the heading of the page?")]),
                      ("assistant", [("text", "Region-based segmentation.")])]),
    ("draw_cat", [("user", [("text", "Draw a close-up of a tabby cat's face.")]),
                  ("assistant", [("text", "Here is a tabby cat."), ("gen", "chelsea")])]),
    ("text_only", [("user", [("text", "What does OCR stand for?")]),
                   ("assistant", [("text", "Optical character recognition.")])]),
]

# (id, source photo, [(instruction, edit name), ...]): a chain applies each edit to the previous result.
SFT_EDIT_CHAINS = [
    ("chelsea_flip_grey", "chelsea", [("Flip the photo horizontally.", "flip"),
                                      ("Now make it black and white.", "flip_grey")]),
    ("rocket_bright_blur", "rocket", [("Make the photo brighter.", "brighter"), ("Blur it a little.", "brighter_blur")]),
    ("coffee_greyscale", "coffee", [("Make the photo black and white.", "greyscale")]),
    ("astronaut_zoom", "astronaut", [("Zoom in 2x on the centre of the photo.", "zoom")]),
]
CHAIN_EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "flip_grey": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("L").convert("RGB"),
    "brighter_blur": lambda im: ImageEnhance.Brightness(im).enhance(1.6).filter(ImageFilter.GaussianBlur(radius=2)),
}

SFT_STORIES = [
    ("launch_day", ["rocket", "astronaut", "camera", "hubble"], [
        "The rocket stood ready on the pad as the sun went down.",
        "Before the launch the astronaut smiled for one last portrait.",
        "A photographer on the field watched the sky through his camera.",
        "Days later the telescope sent back pictures of distant galaxies."]),
    ("slow_morning", ["coffee", "chelsea", "page"], [
        "The morning began with a small cup of espresso.",
        "The cat watched something on the windowsill.",
        "Then it was time to read another chapter of the book."]),
]

# Slides: (deck id, topic, [(title, body, picture photo)]), rendered on a 320 x 180 canvas.
SLIDE_SIZE = (320, 180)
SLIDE_PICTURE_BOX = (168, 40, 308, 166)
SFT_DECKS = [
    ("space", "space exploration", [("Launch", "Rockets carry crews and telescopes into orbit.", "rocket"),
                                    ("Deep field", "One telescope image holds thousands of galaxies.", "hubble")]),
    ("cafe", "our cafe", [("Espresso", "Short, strong and served with crema.", "coffee")]),
]
TRYON = [("astronaut", (64, 150, 260, 320)), ("camera", (120, 40, 230, 250))]  # person, torso box (garment)


def _t(text: str) -> dict:
    return {"text": text}


def _sft_item(kind: str, value) -> dict:
    if kind == "image":
        return {"image": _image_path(value)}
    if kind == "gen":
        return {"image": _image_path(value), "generate": True}
    if kind == "box":
        return {"box": value}
    return _t(value)


def _render_slide(title: str, body: str, picture: Image.Image) -> Image.Image:
    from PIL import ImageDraw

    slide = Image.new("RGB", SLIDE_SIZE, (250, 250, 245))
    draw = ImageDraw.Draw(slide)
    draw.rectangle((0, 0, SLIDE_SIZE[0], 28), fill=(30, 60, 120))
    draw.text((10, 8), title, fill=(255, 255, 255))
    draw.multiline_text((10, 44), "\n".join(body[i:i + 24] for i in range(0, len(body), 24)), fill=(20, 20, 20))
    x0, y0, x1, y1 = SLIDE_PICTURE_BOX
    slide.paste(picture.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS), (x0, y0))
    return slide


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def build_sft_samples(out: Path, photos: dict[str, Image.Image]) -> dict[str, int]:
    """The instruction-tuning sample files (``sft_*.jsonl``) and their derived images; returns record counts."""
    chats = [{"id": f"sample_sft_chat/{cid}", "source": "sample_sft_chat",
              "turns": [{"role": role, "content": [_sft_item(k, v) for k, v in items]} for role, items in turns]}
             for cid, turns in SFT_CHATS]
    _write_jsonl(out / "sft_chat.jsonl", chats)

    transforms = {name: fn for _, name, _, fn in EDITS} | CHAIN_EDITS
    edits = []
    for cid, src, steps in SFT_EDIT_CHAINS:
        turns = []
        for k, (instruction, name) in enumerate(steps):
            target = f"images/edits/{src}_{name}.jpg"
            if name in CHAIN_EDITS:  # single edits were written with edit.jsonl's
                _write_bytes(out / target, jpeg_bytes(transforms[name](photos[src])))
            source = [{"image": _image_path(src), "grid": "1x1"}] if k == 0 else []
            turns += [{"role": "user", "content": [*source, _t(instruction)]},
                      {"role": "assistant", "content": [{"image": target, "generate": True}]}]
        edits.append({"id": f"sample_sft_edit/{cid}", "source": "sample_sft_edit", "turns": turns})
    _write_jsonl(out / "sft_edit.jsonl", edits)

    stories = []
    for sid, names, sentences in SFT_STORIES:
        steps = list(zip(names, sentences))
        # the prompt follows the context sentence after a space, as data_prep/convert_vist.py writes it
        turns = [{"role": "user", "content": [{"image": _image_path(steps[0][0])},
                                              _t(f"{steps[0][1]} Continue the story.")]}]
        for k, (name, sentence) in enumerate(steps[1:]):
            if k:
                turns.append({"role": "user", "content": [_t("Continue the story.")]})
            turns.append({"role": "assistant", "content": [_t(sentence), {"image": _image_path(name), "generate": True}]})
        stories.append({"id": f"sample_sft_story/{sid}", "source": "sample_sft_story", "turns": turns})
    _write_jsonl(out / "sft_story.jsonl", stories)

    decks = []
    for did, topic, slides in SFT_DECKS:
        turns = []
        for k, (title, body, name) in enumerate(slides):
            _write_bytes(out / f"images/slides/{did}_{k}.png", _png_bytes(_render_slide(title, body, photos[name])))
            turns += [{"role": "user", "content": [_t(f'Make a slide titled "{title}" for a deck about {topic}.')]},
                      {"role": "assistant", "content": [
                          _t(f"{title}\n{body}"), _t("\npicture"),  # labels on their own line (convert_slides)
                          {"box": list(map(float, SLIDE_PICTURE_BOX)), "canvas": list(SLIDE_SIZE)},
                          {"image": _image_path(name), "generate": True}]}]
        decks.append({"id": f"sample_sft_ppt/{did}", "source": "sample_sft_ppt", "slides": len(slides), "turns": turns})
    _write_jsonl(out / "sft_ppt.jsonl", decks)

    tryon = []
    for name, box in TRYON:
        person = photos[name]
        agnostic = person.copy()
        agnostic.paste((128, 128, 128), box)  # the clothing region masked out, as VITON-HD's agnostic images
        _write_bytes(out / f"images/tryon/{name}_agnostic.jpg", jpeg_bytes(agnostic))
        _write_bytes(out / f"images/tryon/{name}_garment.jpg", jpeg_bytes(person.crop(box)))
        tryon.append({"id": f"sample_sft_tryon/{name}", "source": "sample_sft_tryon", "turns": [
            {"role": "user", "content": [{"image": f"images/tryon/{name}_agnostic.jpg", "grid": "1x1"},
                                         {"image": f"images/tryon/{name}_garment.jpg", "grid": "1x1"},
                                         _t("Dress the person in this garment.")]},
            {"role": "assistant", "content": [{"image": _image_path(name), "generate": True}]}]})
    _write_jsonl(out / "sft_tryon.jsonl", tryon)
    return {"sft_chat": len(chats), "sft_edit": len(edits), "sft_story": len(stories), "sft_ppt": len(decks),
            "sft_tryon": len(tryon)}


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
               "shard": n_shard, **build_sft_samples(out, photos)}
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
    for name in ("sft_chat", "sft_edit", "sft_story", "sft_ppt", "sft_tryon"):
        print(f"  {name + '.jsonl':<18} {summary[name]} conversations")
    return summary


if __name__ == "__main__":
    main()
