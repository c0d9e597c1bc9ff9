"""Reads a demo scene's attributes back from pixels: does a generated picture show what its
caption asked for? (issue 16: the built-in model's quality test, and the yardstick for
accelerations that trade exactness for speed.)

    read(pixels) -> Reading(background, colour, shape, place, size, direction)
    judge(scene, pixels) -> {"colour": bool, "background": bool, "shape": bool, "place": bool, "motion": bool}

How: the background is the nearest palette colour to the median of the border pixels; the pixels
farther than a threshold from it give the object's colour (the nearest palette colour to their
median); the object is then the largest connected region of pixels nearer that colour than the
background's. Its place is the nearest place centre to its centroid (frame 0). Its shape comes from its
outline's corners (the 3rd, 4th and 5th harmonics of the centroid-to-outline distance around it:
triangle, square, star; none strong enough: circle); its size from the distance to its farthest pixel. A clip's direction is the
larger axis of the centroid's travel from the first frame to the last. Numpy only; pixels are uint8 (F, H, W, 3) or (H, W, 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffserve.demo import data
from diffserve.demo.data import COLOURS, PLACES, SIZE, Scene

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)
_NAMES = list(COLOURS)
OBJECT_DISTANCE = 80.0  # RGB distance from the background above which a pixel is the object
# The outline's radius profile (PROFILE_BINS angles): its 3rd, 4th or 5th harmonic, relative to the mean radius,
# is ~0.3 for a triangle, ~0.15 for a square and ~0.5 for a star as data.py draws them, and below 0.01 for a circle.
PROFILE_BINS = 36
FRAME_BLUR = 2  # pixels inside the pictures' frame where the background is read
CORNERED = 0.05  # the strongest of those harmonics must reach this for a shape to have corners
SMALL_RADIUS_MAX = 16.0  # pixels from the centroid to the farthest object pixel: small shapes ~13-14, large ~18-19


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None  # None: no object found
    shape: str | None
    place: str | None
    size: str | None
    direction: str | None  # clips only


def nearest_colour(rgb) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - np.asarray(rgb, dtype=np.float64)) ** 2).sum(-1)))]


def _frames(pixels: np.ndarray) -> np.ndarray:
    pixels = np.asarray(pixels)
    return pixels[None] if pixels.ndim == 3 else pixels


def _object(frame: np.ndarray, background_rgb: np.ndarray) -> np.ndarray:
    return np.sqrt(((frame.astype(np.float64) - background_rgb) ** 2).sum(-1)) > OBJECT_DISTANCE


def _radius(mask: np.ndarray) -> float:
    """From the centroid to the farthest object pixel's far edge."""
    ys, xs = np.nonzero(mask)
    return float(np.sqrt((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2).max()) + 0.5


def _largest_part(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of `mask`: stray specks elsewhere (a decoder's edge artefacts, a
    second faint blob) must not move the centroid or stretch the radius."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = 0, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else mask


def _nearer(frame: np.ndarray, object_rgb: np.ndarray, background_rgb: np.ndarray) -> np.ndarray:
    pixels = frame.astype(np.float64)
    return ((pixels - object_rgb) ** 2).sum(-1) < ((pixels - background_rgb) ** 2).sum(-1)


def _shape(mask: np.ndarray) -> str:
    """By the outline's corners: the distance from the centroid to the outline as a function of the
    angle has 3 bumps for a triangle, 4 for a square, 5 for a star and none for a circle, and a blurred
    or rounded shape keeps them (where its fill ratios drift toward a circle's)."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    padded = np.pad(mask, 1)
    inside = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    by, bx = np.nonzero(mask & ~inside)
    angle = np.arctan2(by - cy, bx - cx)
    distance = np.hypot(by - cy, bx - cx) + 0.5
    bins = ((angle + np.pi) / (2 * np.pi) * PROFILE_BINS).astype(int) % PROFILE_BINS
    radius = np.full(PROFILE_BINS, np.nan)
    np.fmax.at(radius, bins, distance)
    seen = ~np.isnan(radius)
    radius = np.interp(np.arange(PROFILE_BINS), np.arange(PROFILE_BINS)[seen], radius[seen], period=PROFILE_BINS)
    harmonics = np.abs(np.fft.rfft(radius)) / (radius.mean() * PROFILE_BINS / 2)  # relative amplitude of each
    k = 3 + int(np.argmax(harmonics[3:6]))
    if harmonics[k] < CORNERED:
        return "circle"
    return {3: "triangle", 4: "square", 5: "star"}[k]


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


def read(pixels: np.ndarray) -> Reading:
    frames = _frames(pixels)
    h, w = frames.shape[1:3]
    scale = SIZE / max(h, w)
    edge = round(data.FRAME / scale)  # the pictures' grey frame, left out of the reading
    if edge:
        frames = frames[:, edge:h - edge, edge:w - edge]
    first = frames[0]
    ring = FRAME_BLUR if edge else 0  # inside a frame, the background a few pixels in (a decoder blurs the frame's edge)
    border = np.concatenate([first[ring], first[-1 - ring], first[:, ring], first[:, -1 - ring]]).astype(np.float64)
    background = nearest_colour(np.median(border, axis=0))
    background_rgb = np.asarray(COLOURS[background], dtype=np.float64)
    rough = _object(first, background_rgb)
    if rough.sum() < 8:
        return Reading(background, None, None, None, None, None)
    # Its colour from its core: the half of those pixels farthest from the background (edges blend).
    distance = np.sqrt(((first.astype(np.float64) - background_rgb) ** 2).sum(-1))[rough]
    core = first[rough][distance >= np.median(distance)]
    colour = nearest_colour(np.median(core.astype(np.float64), axis=0))
    # The object's outline: pixels nearer its colour than the background's (the halfway line of a
    # blurred edge), so a soft picture keeps the shape's proportions.
    masks = [_largest_part(_nearer(f, np.asarray(COLOURS[colour], dtype=np.float64), background_rgb)) for f in frames]
    mask = masks[0]
    if mask.sum() < 8:
        return Reading(background, colour, None, None, None, None)
    cx, cy = _centroid(mask)
    cx, cy = (cx + edge) * scale, (cy + edge) * scale
    place = min(PLACES, key=lambda p: (PLACES[p][1][0] - cx) ** 2 + (PLACES[p][1][1] - cy) ** 2)
    size = "small" if _radius(mask) * scale <= SMALL_RADIUS_MAX else "large"
    direction = None
    if len(frames) > 1 and masks[-1].sum() >= 8:
        (x0, y0), (x1, y1) = _centroid(masks[0]), _centroid(masks[-1])
        dx, dy = x1 - x0, y1 - y0
        direction = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    return Reading(background, colour, _shape(mask), place, size, direction)


def judge(scene: Scene, pixels: np.ndarray) -> dict[str, bool]:
    """Which of the scene's attributes the pixels show. Stills: colour, background, shape, place
    (and size); clips: colour, background, shape, motion."""
    r = read(pixels)
    verdict = {"colour": r.colour == scene.colour, "background": r.background == scene.background, "shape": r.shape == scene.shape}
    if scene.direction:
        verdict["motion"] = r.direction == scene.direction
    else:
        verdict["place"] = r.place == scene.place
        verdict["size"] = r.size == scene.size
    return verdict


def score(verdicts: list[dict[str, bool]]) -> dict[str, float]:
    """Share of scenes with each attribute right; "colour+background" needs both."""
    keys = sorted({k for v in verdicts for k in v})
    out = {k: float(np.mean([v[k] for v in verdicts if k in v])) for k in keys}
    out["colour+background"] = float(np.mean([v["colour"] and v["background"] for v in verdicts]))
    return out
