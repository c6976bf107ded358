"""The toy world: pictures of one coloured, patterned shape on a plain background, with captions.

Every picture is a pure function of its seed, so a data set is a range of seeds and the caption
states exactly what was drawn. The base model is pretrained on this world (pretrain.py), the
example character is an object of this world it never saw (SUBJECT), and the attribute classifier
of evaluate.py reads the same attributes back from generated pictures.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (240, 210, 40), "purple": (140, 60, 190), "orange": (245, 140, 30),
           "white": (245, 245, 245), "black": (25, 25, 25)}
PATTERNS = ("plain", "striped", "dotted")
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS,
              "background": tuple(COLOURS)}
# Each attribute word is left out of a caption with this probability, so a short prompt such as
# "a photo of a star" means any star: the class prompt of DreamBooth has a diverse prior.
DROP_WORD = 0.4


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    pattern: str
    background: str

    def caption(self, rng: random.Random | None = None) -> str:
        """"a photo of a red striped star on a blue background", words dropped at random if rng."""
        def keep():
            return rng is None or rng.random() >= DROP_WORD

        text = photo_of(self.shape, self.colour, self.pattern, keep)
        return on_background(text, self.background) if keep() else text


def caption_variants(thing: Thing) -> dict[str, float]:
    """Every caption that thing.caption(rng) can give, with its probability: each attribute word
    kept or dropped (DROP_WORD) on its own."""
    variants = {}
    for keeps in itertools.product((True, False), repeat=3):
        calls, used = iter(keeps), []

        class Fixed:  # an rng whose draws keep or drop the words as `keeps` says
            @staticmethod
            def random():
                used.append(next(calls))
                return 1.0 if used[-1] else 0.0

        text = thing.caption(Fixed())
        variants[text] = math.prod(1 - DROP_WORD if kept else DROP_WORD for kept in used)
    return variants


def on_background(text: str, colour: str) -> str:
    """"a photo of a star" -> "a photo of a star on a blue background"."""
    return f"{text} on {_article(colour)}{colour} background"


def photo_of(shape: str, colour: str, pattern: str, keep=lambda: True) -> str:
    """"a photo of an orange dotted star": a caption without its background, each attribute word
    (colour, then pattern unless plain) kept where keep() says so."""
    words = [w for w in (colour, pattern if pattern != "plain" else None) if w and keep()] + [shape]
    return "a photo of " + _article(words[0]) + " ".join(words)


def _article(word: str) -> str:
    return "an " if word[0] in "aeiou" else "a "


# The demo character: a combination of features that pretraining never shows (see `sample`).
SUBJECT = Thing("star", "purple", "dotted", "white")


def sample(rng: random.Random) -> Thing:
    """A random thing of the world, never the subject's shape, colour and pattern together."""
    while True:
        shape, colour, pattern = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(PATTERNS)
        if (shape, colour, pattern) != (SUBJECT.shape, SUBJECT.colour, SUBJECT.pattern):
            break
    background = rng.choice([c for c in COLOURS if c != colour])
    return Thing(shape, colour, pattern, background)


def pattern_colour(colour: str) -> tuple[int, int, int]:
    return COLOURS["black"] if colour in ("white", "yellow") else COLOURS["white"]


def outline(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners, radii = 4, [r * 0.95] * 4
        turn += math.pi / 4
    elif shape == "triangle":
        corners, radii = 3, [r * 1.1] * 3
    else:  # star: five points, inner radius 0.45
        corners, radii = 10, [r * 1.1 if i % 2 == 0 else r * 0.45 for i in range(10)]
    return [(cx + radii[i] * math.sin(turn + 2 * math.pi * i / corners),
             cy - radii[i] * math.cos(turn + 2 * math.pi * i / corners)) for i in range(corners)]


def draw(thing: Thing, rng: random.Random, width: int = 64, height: int = 64,
         transparent: bool = False) -> Image.Image:
    """The thing at a random place, size and small rotation; RGBA if transparent, else RGB."""
    side = min(width, height)
    r = side * rng.uniform(0.24, 0.38)
    cx = width / 2 + rng.uniform(-1, 1) * (width / 2 - r * 1.1)
    cy = height / 2 + rng.uniform(-1, 1) * (height / 2 - r * 1.1)
    turn = rng.uniform(-0.25, 0.25)
    mask = Image.new("L", (width, height), 0)
    md = ImageDraw.Draw(mask)
    if thing.shape == "circle":
        md.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        md.polygon(outline(thing.shape, cx, cy, r, turn), fill=255)
    body = Image.new("RGB", (width, height), COLOURS[thing.colour])
    pattern = body.copy()
    pd = ImageDraw.Draw(pattern)
    period = side / 5.5  # coarse enough to survive the 8x smaller latents
    if thing.pattern == "striped":
        y = cy - r * 1.2 + rng.uniform(0, period)
        while y < cy + r * 1.2:
            pd.rectangle([0, y, width, y + period / 2], fill=pattern_colour(thing.colour))
            y += period
    elif thing.pattern == "dotted":
        dot = period * 0.3
        for iy in range(-4, 5):
            for ix in range(-4, 5):
                x, y = cx + (ix + 0.5 * (iy % 2)) * period, cy + iy * period
                pd.ellipse([x - dot, y - dot, x + dot, y + dot], fill=pattern_colour(thing.colour))
    # the pattern keeps off the rim, so the outline is always in the shape's colour
    body.paste(pattern, (0, 0), mask.filter(ImageFilter.MinFilter(2 * int(side / 32) + 1)))
    background = (0, 0, 0, 0) if transparent else COLOURS[thing.background] + (255,)
    image = Image.new("RGBA", (width, height), background)
    image.paste(body, (0, 0), mask)
    return image if transparent else image.convert("RGB")


def example(seed: int, width: int = 64, height: int = 64) -> tuple[Image.Image, Thing, str]:
    """(picture, what it shows, caption with words dropped at random) for a seed of the world."""
    rng = random.Random(seed)
    thing = sample(rng)
    return draw(thing, rng, width, height), thing, thing.caption(rng)
