"""The micro world: a procedural renderer of 64x64 scenes with a caption for each.

One object with a shape, a colour and a texture (the "style") on a plain background, with
position, size and rotation jitter. Everything is deterministic for a seed. Some shapes and
textures are held out: the base model never sees them, so customization has something real
to teach, and the judge (trained on every concept) can tell whether it was learned.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
_SS = 3  # supersampling factor: edges and fine textures are anti-aliased by box-downsampling

SEEN_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "hexagon")
HELDOUT_SHAPES: tuple[str, ...] = ("heart", "star", "crescent", "arrow")
SHAPES: tuple[str, ...] = SEEN_SHAPES + HELDOUT_SHAPES

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 30),
    "orange": (245, 130, 20),
    "purple": (140, 50, 190),
    "pink": (250, 120, 190),
    "brown": (125, 75, 35),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (18, 18, 18),
    "gray": (128, 128, 128),
    "beige": (225, 205, 160),
    "teal": (20, 120, 120),
    "lavender": (195, 185, 235),
}
SEEN_TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted")
HELDOUT_TEXTURES: tuple[str, ...] = ("checkered", "zigzag")
TEXTURES: tuple[str, ...] = SEEN_TEXTURES + HELDOUT_TEXTURES

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "background": tuple(BACKGROUNDS),
    "texture": TEXTURES,
}

# Ordinary English words the tokenizer knows besides the world's own, so that users' prompts
# ("a photo of my dog in a garden") tokenize into words rather than bytes.
ENGLISH_WORDS: tuple[str, ...] = tuple(
    """a an the of on in with and or my our your this that photo picture image drawing render
    painting sketch illustration style object shape thing toy dog cat person man woman house car
    tree flower garden table room city street sky sea beach mountain forest field snow night day
    light dark bright small big large tiny huge little round sharp soft hard smooth rough pattern
    texture color colour background foreground center left right top bottom corner front back
    high low quality detailed simple clean plain one two three many some very is are was be
    by at to from for as it its new old good best beautiful pretty ugly cute close up view shot
    made wood metal glass stone paper cloth gold silver black white gray grey red green blue
    yellow orange purple pink brown cyan magenta violet navy beige teal lavender maroon olive
    striped dotted checkered zigzag solid spotted plaid polka lines dots stripes squares
    circle square triangle diamond cross hexagon heart star crescent arrow moon sun ring box
    ball cube sphere pyramid oval rectangle pentagon octagon spiral wave zig zag
    sks xyz zwx ohwx""".split()
)

_TEMPLATES_FULL = (
    "a {texture} {color} {shape} on a {background} background",
    "a photo of a {texture} {color} {shape} on a {background} background",
    "a {color} {shape} with a {texture} pattern on a {background} background",
    "{texture} {color} {shape}, {background} background",
    "a picture of a {texture} {color} {shape} in front of a {background} background",
)
_TEMPLATES_PARTIAL = (
    "a {color} {shape} on a {background} background",
    "a photo of a {texture} {color} {shape}",
    "a {color} {shape}",
    "a {texture} {shape} on a {background} background",
    "a {shape} on a {background} background",
    "a {texture} {color} {shape}",
    "a photo of a {shape}",
)


@dataclasses.dataclass(frozen=True)
class Scene:
    """A scene spec: the four attributes and the jitter that places the object."""

    shape: str
    color: str
    texture: str
    background: str
    cx: float = 0.5  # centre, in fractions of the image
    cy: float = 0.5
    size: float = 0.62  # object extent, in fractions of the image
    angle: float = 0.0  # degrees
    phase: float = 0.0  # texture phase, in fractions of a period

    def __post_init__(self) -> None:
        for attr, allowed in ATTRIBUTES.items():
            value = getattr(self, attr)
            if value not in allowed:
                raise ValueError(f"unknown {attr} {value!r}; choose one of: {', '.join(allowed)}")

    def labels(self) -> dict[str, int]:
        """Class indices of the four attributes, in the judge's head order."""
        return {attr: ATTRIBUTES[attr].index(getattr(self, attr)) for attr in ATTRIBUTES}


def random_scene(
    rng: random.Random,
    *,
    shapes: Sequence[str] = SEEN_SHAPES,
    colors: Sequence[str] = tuple(COLORS),
    textures: Sequence[str] = SEEN_TEXTURES,
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
) -> Scene:
    """Draw a scene with jitter from the given attribute pools."""
    return Scene(
        shape=rng.choice(list(shapes)),
        color=rng.choice(list(colors)),
        texture=rng.choice(list(textures)),
        background=rng.choice(list(backgrounds)),
        cx=0.5 + rng.uniform(-0.12, 0.12),
        cy=0.5 + rng.uniform(-0.12, 0.12),
        size=rng.uniform(0.5, 0.72),
        # small rotations only: a square turned by 45 degrees would be a diamond
        angle=rng.uniform(-15.0, 15.0),
        phase=rng.random(),
    )


def _shape_outline(shape: str) -> list[list[tuple[float, float]]]:
    """Polygons (unit extent, centred at 0, y down) whose even-odd fill is the shape."""

    def ngon(n: int, r: float = 0.5, start: float = -90.0) -> list[tuple[float, float]]:
        return [
            (r * math.cos(math.radians(start + 360.0 * k / n)), r * math.sin(math.radians(start + 360.0 * k / n)))
            for k in range(n)
        ]

    def circle(r: float = 0.5, dx: float = 0.0, dy: float = 0.0, n: int = 64) -> list[tuple[float, float]]:
        return [(dx + x, dy + y) for x, y in ngon(n, r)]

    if shape == "circle":
        return [circle()]
    if shape == "square":
        return [[(-0.42, -0.42), (0.42, -0.42), (0.42, 0.42), (-0.42, 0.42)]]
    if shape == "triangle":
        return [[(0.0, -0.5), (0.5, 0.4), (-0.5, 0.4)]]
    if shape == "diamond":
        return [[(0.0, -0.5), (0.32, 0.0), (0.0, 0.5), (-0.32, 0.0)]]
    if shape == "cross":
        a, b = 0.5, 0.16
        return [[(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]]
    if shape == "hexagon":
        return [ngon(6, 0.5, 0.0)]
    if shape == "heart":
        pts = []
        for k in range(96):
            t = 2 * math.pi * k / 96
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 34.0, -y / 34.0 + 0.04))
        return [pts]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 0.52 if k % 2 == 0 else 0.21
            ang = math.radians(-90 + 36 * k)
            pts.append((r * math.cos(ang), r * math.sin(ang) + 0.04))
        return [pts]
    if shape == "crescent":
        return [circle(0.5), circle(0.4, 0.22, -0.08)]
    if shape == "arrow":
        return [[(-0.5, -0.12), (0.05, -0.12), (0.05, -0.34), (0.5, 0.0), (0.05, 0.34), (0.05, 0.12), (-0.5, 0.12)]]
    raise ValueError(f"unknown shape {shape!r}")


def _texture_mask(texture: str, u: np.ndarray, v: np.ndarray, phase: float) -> np.ndarray:
    """1 where the object shows its colour, 0 where it shows the darker shade (u, v in px)."""
    period = 8.0 * _SS
    if texture == "solid":
        return np.ones_like(u)
    if texture == "striped":
        return (np.mod(u / period + phase, 1.0) < 0.5).astype(np.float32)
    if texture == "dotted":
        du = np.mod(u / period + phase, 1.0) - 0.5
        dv = np.mod(v / period + phase, 1.0) - 0.5
        return (du * du + dv * dv > 0.27**2).astype(np.float32)
    if texture == "checkered":
        a = np.floor(u / period + phase) + np.floor(v / period + phase)
        return (np.mod(a, 2) == 0).astype(np.float32)
    if texture == "zigzag":
        tri = np.abs(np.mod(u / period, 1.0) - 0.5) * period  # triangle wave along u
        return (np.mod((v + tri) / period + phase, 1.0) < 0.5).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Render a scene to an RGB image of ``size`` x ``size`` pixels."""
    hi = size * _SS
    extent = scene.size * hi
    ang = math.radians(scene.angle)
    ca, sa = math.cos(ang), math.sin(ang)
    cx, cy = scene.cx * hi, scene.cy * hi

    mask_img = Image.new("L", (hi, hi), 0)
    draw = ImageDraw.Draw(mask_img)
    polys = _shape_outline(scene.shape)
    for i, poly in enumerate(polys):
        pts = [(cx + extent * (x * ca - y * sa), cy + extent * (x * sa + y * ca)) for x, y in poly]
        draw.polygon(pts, fill=255 if i == 0 else 0)
    mask = np.asarray(mask_img, dtype=np.float32) / 255.0

    if hi not in _GRID_CACHE:
        yy, xx = np.mgrid[0:hi, 0:hi].astype(np.float32)
        _GRID_CACHE[hi] = (xx, yy)
    xx, yy = _GRID_CACHE[hi]
    # texture coordinates turn with the object, so stripes stay aligned with it
    u = (xx - cx) * ca + (yy - cy) * sa
    v = -(xx - cx) * sa + (yy - cy) * ca
    tex = _texture_mask(scene.texture, u, v, scene.phase)

    col = np.asarray(COLORS[scene.color], dtype=np.float32)
    shade = col * 0.42
    bg = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    obj = tex[..., None] * col + (1.0 - tex[..., None]) * shade
    img = mask[..., None] * obj + (1.0 - mask[..., None]) * bg
    img = img.reshape(size, _SS, size, _SS, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")


def caption(scene: Scene, rng: random.Random, *, full: bool = False) -> str:
    """A caption for a scene from varied templates; ``full`` names all four attributes."""
    pool = _TEMPLATES_FULL if full or rng.random() < 0.6 else _TEMPLATES_FULL + _TEMPLATES_PARTIAL
    return rng.choice(pool).format(
        shape=scene.shape, color=scene.color, texture=scene.texture, background=scene.background
    )


def prompt_for(shape: str | None = None, color: str | None = None, texture: str | None = None,
               background: str | None = None) -> str:
    """The canonical prompt for the given attributes (the eval suites use this form)."""
    words = [w for w in (texture, color, shape or "shape") if w]
    text = "a " + " ".join(words)
    if background:
        text += f" on a {background} background"
    return text


def scenes(seed: int, n: int, **pools: Sequence[str]) -> Iterator[Scene]:
    """``n`` random scenes from a seeded stream."""
    rng = random.Random(seed)
    for _ in range(n):
        yield random_scene(rng, **pools)


def render_batch(scene_list: Sequence[Scene]) -> np.ndarray:
    """Render scenes to a uint8 array of shape (N, 64, 64, 3)."""
    return np.stack([np.asarray(render(s)) for s in scene_list])
