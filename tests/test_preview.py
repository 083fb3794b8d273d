"""jobs.label --preview: what a person sees: detections above --preview-min-score, one colour per
category, a legend, text scaled to the image."""

from __future__ import annotations

import numpy as np
from PIL import Image

from jobs.labeling.preview import _colour, draw_instances, font_size_for
from maskrcnn.masks import encode_masks


def _instance(height, width, box, category_id, name, score):
    mask = np.zeros((height, width), np.uint8)
    x, y, w, h = box
    mask[y : y + h, x : x + w] = 1
    return {"category_id": category_id, "category": name, "score": score, "bbox": [x, y, w, h], "mask": encode_masks(mask[None])[0]}


def _scene(scale: int):
    width, height = 320 * scale, 240 * scale
    image = Image.new("RGB", (width, height), (128, 128, 128))
    s = scale
    instances = [
        _instance(height, width, (20 * s, 60 * s, 60 * s, 50 * s), 1, "person", 0.97),
        _instance(height, width, (120 * s, 60 * s, 50 * s, 70 * s), 1, "person", 0.81),
        _instance(height, width, (200 * s, 120 * s, 80 * s, 60 * s), 18, "dog", 0.66),
        _instance(height, width, (40 * s, 170 * s, 50 * s, 50 * s), 3, "car", 0.2),  # below 0.5: not drawn
    ]
    return image, instances


def _text_rows(drawn: np.ndarray, box) -> int:
    """Rows of the label above ``box`` (x, y, w, h) that hold dark or white text pixels."""
    x, y, w, _ = box
    above = drawn[:y, x : x + w]
    text = (above.min(axis=2) > 230) | (above.max(axis=2) < 30)
    return int(text.any(axis=1).sum())


def test_preview_draws_confident_detections_by_category_with_a_legend():
    image, instances = _scene(1)
    drawn = np.asarray(draw_instances(image, instances, min_score=0.5))
    original = np.asarray(image)
    assert drawn.shape[0] > original.shape[0] and drawn.shape[1] == original.shape[1]  # the legend strip below
    # the low-scoring car: its mask (and box) untouched
    assert (drawn[170:220, 40:90] == original[170:220, 40:90]).all()
    # both persons share a colour; the dog has another
    person_a, person_b, dog = drawn[80, 50], drawn[90, 145], drawn[150, 240]
    assert (person_a == person_b).all() and not (person_a == dog).all()
    assert not (person_a == original[80, 50]).all()
    # the legend: a swatch of each drawn category's colour, none of the car's
    legend = drawn[original.shape[0] :].reshape(-1, 3)
    colours = {tuple(int(v) for v in c) for c in legend}
    assert _colour(1) in colours and _colour(18) in colours and _colour(3) not in colours
    # with min_score 0 the car is drawn, in its own colour
    everything = np.asarray(draw_instances(image, instances, min_score=0.0))
    assert not (everything[190, 60] == original[190, 60]).all()


def test_preview_text_scales_with_the_image():
    assert font_size_for(320, 240) == 12 and font_size_for(1280, 960) == 24 and font_size_for(4000, 3000) == 75
    rows = []
    for scale in (1, 4):
        image, instances = _scene(scale)
        drawn = np.asarray(draw_instances(image, instances[:1], min_score=0.5))
        rows.append(_text_rows(drawn, instances[0]["bbox"]))
    assert rows[0] >= 6 and rows[1] >= 1.7 * rows[0], rows  # fonts of 12 and 24 pixels
