"""The scheduler derives Qwen-Image-Edit's output size from the input image with the worker's
(and the reference's) rule: its copy in scheduler/images.py equals worker/pipelines/qwen_image.py's
`edit_image_size` followed by the worker's rounding down to the size multiple."""

from __future__ import annotations

import pytest

from diffserve.scheduler.images import edit_output_size
from diffserve.worker.pipelines.qwen_image import edit_image_size

SIZES = [(40, 56), (56, 40), (1024, 1024), (1920, 1080), (1080, 1920), (4000, 3000), (3000, 4000), (512, 511),
         (1, 1), (7, 3), (1000, 333), (333, 1000), (2048, 512), (600, 100), (64, 4096), (12345, 678), (77, 9999)]


@pytest.mark.parametrize("multiple", [16, 32, 48])
@pytest.mark.parametrize("width,height", SIZES)
def test_scheduler_edit_size_equals_the_workers(width, height, multiple):
    w, h = edit_image_size(width, height)
    assert edit_output_size(width, height, multiple) == (w // multiple * multiple, h // multiple * multiple)
