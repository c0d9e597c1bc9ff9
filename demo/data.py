"""Procedural captioned pictures and clips for the built-in demo model (issue 16): shapes on plain
backgrounds, drawn from a seed, no files.

    scene = sample(seed)              # a still: Scene(caption, attributes, ...)
    scene = sample(seed, frames=9)    # a clip: the shape moves one way
    pixels = render(scene)            # uint8 (F, 64, 64, 3)

Captions follow one grammar, so the text encoder needs only the vocabulary below:

    a {size} {colour} {shape} {place} on a {background} background        (still)
    a {colour} {shape} moving {direction} on a {background} background   (clip)

`place` is "in the center", "on the left", "on the right", "at the top" or "at the bottom". The
same attributes are what demo/evaluate.py reads back from generated pixels. Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 64  # pixels per side

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 140, 30),
    "purple": (150, 60, 200),
}
SHAPES = ("circle", "square", "triangle", "star")
# The shape's outer radius in pixels. Not smaller: through the VAE's 4x compression an 11-pixel star comes back
# a round blob, where a 17-pixel one keeps its five points (docs/decisions.md, the demo model).
SIZES = {"small": 13.0, "large": 18.0}
PLACES = {  # caption phrase, centre (x, y) in pixels
    "center": ("in the center", (32.0, 32.0)),
    "left": ("on the left", (20.0, 32.0)),  # a large shape stays inside the picture
    "right": ("on the right", (44.0, 32.0)),
    "top": ("at the top", (32.0, 20.0)),
    "bottom": ("at the bottom", (32.0, 44.0)),
}
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
JITTER = 2.0  # pixels of random offset around a place's centre
CLIP_TRAVEL = 24.0  # pixels a moving shape covers from the first frame to the last


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    background: str
    place: str = "center"  # stills
    direction: str = ""  # clips: where the shape moves
    frames: int = 1
    centre: tuple[float, float] = (32.0, 32.0)  # first frame's centre, pixels (x, y)

    @property
    def caption(self) -> str:
        if self.direction:
            return f"a {self.colour} {self.shape} moving {self.direction} on a {self.background} background"
        return f"a {self.size} {self.colour} {self.shape} {PLACES[self.place][0]} on a {self.background} background"

    def centres(self) -> list[tuple[float, float]]:
        """The shape's centre in each frame."""
        if not self.direction or self.frames == 1:
            return [self.centre] * self.frames
        dx, dy = DIRECTIONS[self.direction]
        step = CLIP_TRAVEL / (self.frames - 1)
        return [(self.centre[0] + dx * step * i, self.centre[1] + dy * step * i) for i in range(self.frames)]


LOOSE = 0.25  # how often training leaves a still's size, and (independently) its place, out of its caption


def loose_caption(scene: Scene, rng: np.random.Generator) -> str:
    """The caption as people write prompts: a still's size and place each left out 1 time in 4 ("a red
    circle on a blue background"), so that the model also draws something sensible when they are not said."""
    if scene.direction:
        return scene.caption
    size = "" if rng.random() < LOOSE else f"{scene.size} "
    place = "" if rng.random() < LOOSE else f" {PLACES[scene.place][0]}"
    return f"a {size}{scene.colour} {scene.shape}{place} on a {scene.background} background"


def vocabulary() -> list[str]:
    """Every word a caption can use, in a fixed order."""
    words = ["a", "on", "background", "moving", "in", "the", "at", "center", "left", "right", "top", "bottom", "up", "down"]
    for word in [*COLOURS, *SHAPES, *SIZES]:
        if word not in words:
            words.append(word)
    return words


def sample(seed: int, frames: int = 1) -> Scene:
    """A scene drawn from `seed` alone (numpy's PCG64): a still for frames=1, else a clip."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    colour = names[rng.integers(len(names))]
    background = names[rng.integers(len(names) - 1)]
    if background == colour:  # never the shape's own colour
        background = names[-1]
    shape = SHAPES[rng.integers(len(SHAPES))]
    jitter = tuple(float(v) for v in rng.uniform(-JITTER, JITTER, size=2))
    if frames == 1:
        size = list(SIZES)[rng.integers(len(SIZES))]
        place = list(PLACES)[rng.integers(len(PLACES))]
        cx, cy = PLACES[place][1]
        return Scene(colour, shape, size, background, place=place, centre=(cx + jitter[0], cy + jitter[1]))
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    dx, dy = DIRECTIONS[direction]
    start = (32.0 - dx * CLIP_TRAVEL / 2 + jitter[0] * (dx == 0), 32.0 - dy * CLIP_TRAVEL / 2 + jitter[1] * (dy == 0))
    return Scene(colour, shape, "large", background, direction=direction, frames=frames, centre=start)  # clips: one size


def shape_mask(shape: str, centre: tuple[float, float], radius: float, size: int = SIZE) -> np.ndarray:
    """(size, size) bool: the pixels whose centres fall inside the shape."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = x - centre[0], y - centre[1]
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        half = radius * 0.8
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # pointing up, inscribed in the circle of `radius`
        top, base = -radius, radius * 0.5
        width_at = (dy - top) / (base - top) * radius * np.sqrt(3) / 2  # half width at this row
        return (dy >= top) & (dy <= base) & (np.abs(dx) <= width_at)
    if shape == "star":  # five points, inner radius 0.4 of the outer one
        angle = (np.arctan2(dy, dx) + np.pi / 2) % (2 * np.pi / 5)  # one point up
        half = np.pi / 5
        t = np.abs(angle - half) / half  # 1 at a point, 0 between two
        inner, outer = 0.4 * radius, radius
        # The edge from an inner vertex to an outer one, in polar form (a straight line).
        limit = inner * outer * np.sin(half) / (outer * np.sin(half * (1 - t)) + inner * np.sin(half * t) + 1e-9)
        limit = np.where(t > 0.999, outer, limit)
        return np.hypot(dx, dy) <= limit
    raise ValueError(f"unknown shape {shape!r}")


# A grey frame this many pixels wide round every picture (0: none). Wan's DiT has no absolute position
# embedding (RoPE is relative): a frame in the pictures tells it where the edges are (docs/decisions.md).
FRAME = 3
FRAME_RGB = (128, 128, 128)  # in no caption's palette


def render(scene: Scene) -> np.ndarray:
    """uint8 (F, SIZE, SIZE, 3)."""
    out = np.empty((scene.frames, SIZE, SIZE, 3), dtype=np.uint8)
    out[:] = COLOURS[scene.background]
    radius = SIZES[scene.size]
    for i, centre in enumerate(scene.centres()):
        out[i][shape_mask(scene.shape, centre, radius)] = COLOURS[scene.colour]
    if FRAME:
        out[:, :FRAME], out[:, -FRAME:], out[:, :, :FRAME], out[:, :, -FRAME:] = (FRAME_RGB,) * 4
    return out
