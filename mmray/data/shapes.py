"""The synthetic "shapes" data set: small images of coloured shapes with captions and questions about them.

It exists so that every stage (data, training, evaluation) can be tested end to end without downloading anything,
on a task a tiny model can actually learn: the caption and the answers follow from the pixels, so retrieval,
captioning and VQA metrics move well above chance when training works and stay at chance when it does not.

Sample ``index`` of data set ``seed`` is drawn from its own random stream, seeded by (seed, index) alone, so a
sample never depends on how many samples are generated, in which order, or by which worker.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

# The generator's version: raise it whenever a (seed, index) gives other bytes or questions than before (2: the
# ``size`` questions). The cached embedded data set is named with it (mmray.train.trainer.synthetic_dir).
VERSION = 2
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 0),
    "purple": (140, 40, 180),
    "orange": (250, 130, 0),
}
# Side of an object's bounding square, as a fraction of the image width.
SIZES: dict[str, float] = {"small": 0.18, "large": 0.34}

MAX_OBJECTS = 3
MIN_IMAGE_SIZE = 32  # below this, three small shapes no longer fit side by side
NUMBER_WORDS = ("zero", "one", "two", "three")
_MARGIN = 2          # pixels kept free at the image border and between neighbouring objects
_BACKGROUND = (200, 245)  # grey level range of the plain background


@dataclass
class ShapesSample:
    """One generated scene.

    ``objects`` run left to right; each has ``shape``, ``colour``, ``size`` and ``bbox`` = [x0, y0, x1, y1] in
    pixels, end-exclusive. Their x-ranges never overlap, which is what makes "left of" unambiguous.
    ``qa`` holds dicts with ``question``, ``answer`` (one word) and ``type`` (count, colour, shape, position, size).
    """

    image: Image.Image
    caption: str
    objects: list[dict] = field(default_factory=list)
    qa: list[dict] = field(default_factory=list)


def _rng(seed: int, index: int) -> random.Random:
    """A random stream for one sample only; a string seed is hashed with SHA-512, stable across runs and platforms."""
    return random.Random(f"shapes:{seed}:{index}")


def _pixel_side(size: str, image_size: int) -> int:
    return max(4, round(SIZES[size] * image_size))


def _choose_sizes(rng: random.Random, count: int, image_size: int) -> list[str]:
    """Sizes for ``count`` objects that fit side by side; redraws (deterministically) until they do."""
    while True:
        sizes = [rng.choice(tuple(SIZES)) for _ in range(count)]
        used = sum(_pixel_side(s, image_size) for s in sizes) + _MARGIN * (count + 1)
        if used <= image_size:
            return sizes


def _split_slack(rng: random.Random, slack: int, parts: int) -> list[int]:
    """Split ``slack`` free pixels into ``parts`` random non-negative gaps."""
    cuts = sorted(rng.randint(0, slack) for _ in range(parts - 1))
    bounds = [0, *cuts, slack]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _layout(rng: random.Random, sizes: list[str], image_size: int) -> list[list[int]]:
    """Bounding boxes left to right with disjoint x-ranges and random gaps and heights."""
    sides = [_pixel_side(s, image_size) for s in sizes]
    slack = image_size - sum(sides) - _MARGIN * (len(sides) + 1)
    gaps = _split_slack(rng, slack, len(sides) + 1)
    boxes, x = [], 0
    for side, gap in zip(sides, gaps):
        x += _MARGIN + gap
        y = rng.randint(_MARGIN, image_size - _MARGIN - side)
        boxes.append([x, y, x + side, y + side])
        x += side
    return boxes


def _draw(draw: ImageDraw.ImageDraw, shape: str, bbox: list[int], rgb: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = bbox[0], bbox[1], bbox[2] - 1, bbox[3] - 1  # PIL boxes include their last pixel
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=rgb)
    elif shape == "cross":
        half = max(1, (x1 - x0 + 1) // 6)  # bar thickness is about a third of the side
        draw.rectangle((x0, round(cy) - half, x1, round(cy) + half), fill=rgb)
        draw.rectangle((round(cx) - half, y0, round(cx) + half, y1), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def describe(obj: dict) -> str:
    """``"a large red circle"``: the noun phrase for one object in captions."""
    return f"a {obj['size']} {obj['colour']} {obj['shape']}"


def make_caption(objects: list[dict]) -> str:
    """The caption for objects ordered left to right; one fixed template per object count."""
    phrases = [describe(o) for o in objects]
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        return f"{phrases[0]} left of {phrases[1]}"
    return f"{', '.join(phrases[:-1])} and {phrases[-1]} from left to right"


def _qa(question: str, answer: str, kind: str) -> dict:
    return {"question": question, "answer": answer, "type": kind}


def _unique(objects: list[dict], key: str) -> list[dict]:
    """Objects whose ``key`` value occurs once in the scene: only those can be referred to by it alone."""
    values = [o[key] for o in objects]
    return [o for o in objects if values.count(o[key]) == 1]


def make_qa(objects: list[dict], rng: random.Random) -> list[dict]:
    """Questions whose answers follow unambiguously from the scene, each answered by a single word.

    Types: ``count`` (how many shapes), ``colour`` (the colour of the object named by its shape), ``shape`` (the
    shape of the object named by its colour), ``position`` (is one object left of another) and ``size`` (the colour
    of the object named by its size, in a scene of two or more). All but ``count`` bind the question to one object
    of the scene. ``size`` is the binding a tiny model learns quickly: at 32 px a small and a large object differ in
    area by 3.4x, while telling shapes apart takes many steps. Its questions come last and draw nothing from ``rng``,
    so the other questions are the same as before it existed.
    """
    qa = [_qa("how many shapes are there?", NUMBER_WORDS[len(objects)], "count")]
    qa += [_qa(f"what colour is the {o['shape']}?", o["colour"], "colour") for o in _unique(objects, "shape")]
    qa += [_qa(f"what shape is the {o['colour']} object?", o["shape"], "shape") for o in _unique(objects, "colour")]
    names = [f"{o['colour']} {o['shape']}" for o in objects]
    nameable = [i for i, name in enumerate(names) if names.count(name) == 1]
    for i in nameable:
        for j in (j for j in nameable if j > i):
            first, second = (i, j) if rng.random() < 0.5 else (j, i)  # "yes" and "no" equally often
            answer = "yes" if first < second else "no"
            qa.append(_qa(f"is the {names[first]} left of the {names[second]}?", answer, "position"))
    if len(objects) > 1:
        qa += [_qa(f"what colour is the {o['size']} shape?", o["colour"], "size") for o in _unique(objects, "size")]
    return qa


def generate_sample(seed: int, index: int, image_size: int = 64) -> ShapesSample:
    """Sample ``index`` of the data set ``seed``: an RGB image of 1 to 3 shapes, its caption and QA pairs."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
    rng = _rng(seed, index)
    count = rng.randint(1, MAX_OBJECTS)
    sizes = _choose_sizes(rng, count, image_size)
    grey = rng.randint(*_BACKGROUND)
    image = Image.new("RGB", (image_size, image_size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    objects = []
    for size, bbox in zip(sizes, _layout(rng, sizes, image_size)):
        shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
        _draw(draw, shape, bbox, COLOURS[colour])
        objects.append({"shape": shape, "colour": colour, "size": size, "bbox": bbox})
    return ShapesSample(image=image, caption=make_caption(objects), objects=objects, qa=make_qa(objects, rng))
