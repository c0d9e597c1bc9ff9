"""The demo's procedural data and the evaluator that reads scenes back from pixels (issue 16).
Numpy only: the fast tier."""

from __future__ import annotations

import numpy as np
import pytest

from diffserve.demo.data import COLOURS, DIRECTIONS, PLACES, SHAPES, SIZE, loose_caption, render, sample, vocabulary
from diffserve.demo.evaluate import judge, read, score


def test_sampling_is_deterministic_and_covers_every_attribute():
    assert sample(7) == sample(7) and np.array_equal(render(sample(7)), render(sample(7)))
    stills = [sample(i) for i in range(300)]
    clips = [sample(i, frames=9) for i in range(200)]
    assert {s.shape for s in stills} == set(SHAPES) and {s.colour for s in stills} == set(COLOURS)
    assert {s.place for s in stills} == set(PLACES) and {s.direction for s in clips} == set(DIRECTIONS)
    assert all(s.colour != s.background for s in stills + clips)


def test_captions_use_only_the_vocabulary():
    words = set(vocabulary())
    for scene in [sample(i) for i in range(200)] + [sample(i, frames=5) for i in range(100)]:
        assert set(scene.caption.split()) <= words, scene.caption


def test_render_shapes_and_clip_motion():
    scene = sample(3, frames=9)
    pixels = render(scene)
    assert pixels.shape == (9, SIZE, SIZE, 3) and pixels.dtype == np.uint8
    assert not np.array_equal(pixels[0], pixels[-1])  # it moved
    assert render(sample(3)).shape == (1, SIZE, SIZE, 3)


def test_the_evaluator_reads_every_rendered_scene_back():
    stills = score([judge(s, render(s)) for s in (sample(i) for i in range(400))])
    clips = score([judge(s, render(s)) for s in (sample(i, frames=9) for i in range(150))])
    assert min(stills.values()) >= 0.99, stills
    assert min(clips.values()) >= 0.99, clips


def test_the_evaluator_tolerates_noise_and_blur():
    rng = np.random.default_rng(0)

    def soften(x):
        y = x.astype(float) + rng.normal(0, 15, x.shape)
        padded = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        y = sum(padded[:, i:i + SIZE, j:j + SIZE] for i in range(3) for j in range(3)) / 9
        return np.clip(y, 0, 255).astype(np.uint8)

    stills = score([judge(s, soften(render(s))) for s in (sample(i) for i in range(300))])
    assert stills["colour+background"] >= 0.95 and stills["place"] >= 0.95 and stills["shape"] >= 0.8, stills


@pytest.mark.parametrize("attribute", ["colour", "background", "shape", "place"])
def test_the_evaluator_says_no_to_the_wrong_picture(attribute):
    """A scene judged against a picture that differs in one attribute fails that attribute."""
    base = sample(11)
    other = {"colour": "green" if base.colour != "green" else "red", "background": "blue" if base.background != "blue" else "white",
             "shape": "square" if base.shape != "square" else "star", "place": "left" if base.place != "left" else "right"}[attribute]
    if attribute == "colour" and other == base.background or attribute == "background" and other == base.colour:
        other = "yellow" if "yellow" not in (base.colour, base.background) else "black"
    changed = base.__class__(**{**base.__dict__, attribute: other, "centre": PLACES[other][1] if attribute == "place" else base.centre})
    assert judge(base, render(changed))[attribute] is False
    assert judge(changed, render(changed))[attribute] is True


def test_a_blank_picture_has_no_object():
    blank = np.full((SIZE, SIZE, 3), COLOURS["blue"], dtype=np.uint8)
    r = read(blank)
    assert r.background == "blue" and r.colour is None and r.shape is None


def test_stray_specks_of_the_object_colour_do_not_change_the_reading():
    """A decoder's edge artefacts in the object's colour (here a 3x3 speck in a far corner) are not the
    object: without keeping only its largest region, the radius doubles and a circle reads as a star."""
    for seed in range(40):
        scene = sample(seed)
        picture = render(scene)[0].copy()
        cx, cy = scene.centre
        y0, x0 = (58 if cy < 32 else 2), (58 if cx < 32 else 2)
        picture[y0:y0 + 3, x0:x0 + 3] = COLOURS[scene.colour]
        assert all(judge(scene, picture).values()), (scene.caption, read(picture))


def test_loose_captions_leave_size_and_place_out_sometimes_and_keep_the_vocabulary():
    rng = np.random.default_rng(0)
    words = set(vocabulary())
    stills = [sample(i) for i in range(200)]
    loose = [loose_caption(s, rng) for s in stills]
    assert all(set(c.split()) <= words for c in loose)
    assert any(c == s.caption for c, s in zip(loose, stills))  # most keep everything
    assert any(s.size not in c.split() for c, s in zip(loose, stills))  # some leave the size out
    assert any(PLACES[s.place][0] not in c for c, s in zip(loose, stills))  # some the place
    assert all(f"{s.colour} {s.shape}" in c and c.endswith(f"on a {s.background} background") for c, s in zip(loose, stills))
    clip = sample(5, frames=9)
    assert loose_caption(clip, rng) == clip.caption
