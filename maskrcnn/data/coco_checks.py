"""Checks of a COCO instances file, for :class:`maskrcnn.data.coco.CocoDataset`.

Each check raises ``AnnotationError`` naming the file (``uri``), the offending entry
(``annotations[3] (id 17)``) and what is wrong with it, so that a user can fix the file.
Annotations that are well formed but degenerate (an empty box or mask) are not errors: the
dataset leaves them out of its targets and says so in one ``DegenerateAnnotationWarning``
(``degenerate_message``).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from maskrcnn.masks import validate_segmentation
from maskrcnn.storage import open_uri

__all__ = [
    "AnnotationError",
    "load_instances",
    "where",
    "check_images",
    "check_categories",
    "check_keypoint_categories",
    "check_annotation",
    "check_rle_strings",
    "rle_string_runs",
    "rle_strings_runs",
]


class AnnotationError(ValueError):
    """A malformed COCO annotation file; the message names the file and the offending entry."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fail(uri: str, where: str, problem: str) -> AnnotationError:
    return AnnotationError(f"{uri}: {where}: {problem}")


def where(index: int, entry: Any, key: str = "annotations") -> str:
    """How a message names ``data[key][index]``: ``annotations[3] (id 17)``."""
    if isinstance(entry, dict) and "id" in entry:
        return f"{key}[{index}] (id {entry['id']!r})"
    return f"{key}[{index}]"


def load_instances(uri: str, storage_options: dict[str, Any] | None) -> dict:
    """The JSON object at ``uri``, checked to have the lists ``images``, ``annotations`` and ``categories``."""
    with open_uri(uri, "rb", storage_options) as f:
        raw = f.read()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AnnotationError(f"{uri}: not a JSON file ({error})") from None
    if not isinstance(data, dict):
        raise AnnotationError(
            f"{uri}: expected a JSON object with 'images', 'annotations' and 'categories', got a {type(data).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise AnnotationError(f"{uri}: missing '{key}'; a COCO instances file needs 'images', 'annotations' and 'categories'")
        if not isinstance(data[key], list):
            raise AnnotationError(f"{uri}: '{key}' must be a list, got a {type(data[key]).__name__}")
    return data


def check_images(uri: str, images: list) -> dict[int, dict]:
    """``images`` by id, each checked to have a unique integer id, a file name and a positive size."""
    by_id: dict[int, dict] = {}
    for index, image in enumerate(images):
        at = where(index, image, "images")
        if not isinstance(image, dict):
            raise _fail(uri, at, f"expected an object, got {type(image).__name__}")
        if not _is_int(image.get("id")):
            raise _fail(uri, at, "'id' must be an integer")
        if image["id"] in by_id:
            raise _fail(uri, at, f"duplicate image id {image['id']}")
        file_name = image.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise _fail(uri, at, "'file_name' must be a non-empty string")
        for key in ("width", "height"):
            if not _is_int(image.get(key)) or image[key] <= 0:
                raise _fail(uri, at, f"'{key}' must be a positive integer, got {image.get(key)!r}")
        by_id[image["id"]] = image
    return by_id


def check_categories(uri: str, categories: list) -> dict[int, dict]:
    """``categories`` by id (at least one), each checked to have a unique integer id and a name."""
    by_id: dict[int, dict] = {}
    for index, category in enumerate(categories):
        at = where(index, category, "categories")
        if not isinstance(category, dict):
            raise _fail(uri, at, f"expected an object, got {type(category).__name__}")
        if not _is_int(category.get("id")):
            raise _fail(uri, at, "'id' must be an integer")
        if category["id"] in by_id:
            raise _fail(uri, at, f"duplicate category id {category['id']}")
        if not isinstance(category.get("name"), str):
            raise _fail(uri, at, "'name' must be a string")
        by_id[category["id"]] = category
    if not by_id:
        raise AnnotationError(f"{uri}: 'categories' is empty; name at least one class")
    return by_id


def check_keypoint_categories(uri: str, categories: dict[int, dict]) -> tuple[list[str], list[list[int]]]:
    """The keypoint names and skeleton that the categories share (none: no keypoints)."""
    names: list[str] | None = None
    skeleton: list[list[int]] = []
    for index, category in enumerate(categories.values()):
        at = where(index, category, "categories")
        listed = category.get("keypoints")
        if not listed:
            continue
        if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
            raise _fail(uri, at, f"'keypoints' must be a list of keypoint names, got {listed!r}")
        if names is not None and listed != names:
            raise _fail(uri, at, f"'keypoints' {listed} differ from another category's {names}; one model predicts one set of keypoints")
        bones = category.get("skeleton", [])
        if not isinstance(bones, list) or not all(
            isinstance(b, list) and len(b) == 2 and all(_is_int(v) and 1 <= v <= len(listed) for v in b) for b in bones
        ):
            raise _fail(uri, at, f"'skeleton' must be a list of [i, j] keypoint numbers in 1..{len(listed)}, got {bones!r}")
        names, skeleton = listed, skeleton or [list(b) for b in bones]
    return names or [], skeleton


def check_annotation(
    uri: str, ann: Any, at: str, images: dict[int, dict], categories: dict[int, dict], seen_ids: set, num_keypoints: int,
    rle_strings: list | None = None,
) -> None:
    """One annotation: its ids (adding its own to ``seen_ids``), box, segmentation (within its
    image of ``images``), ``iscrowd``, ``area`` and, where it has them, its ``num_keypoints`` keypoints.
    A compressed RLE's runs are read here, or, given ``rle_strings``, appended to it as (``at``,
    counts, height, width) for ``check_rle_strings``, which reads a whole file's at once (a
    self-training round's pseudo-labels are millions of them)."""
    if not isinstance(ann, dict):
        raise _fail(uri, at, f"expected an object, got {type(ann).__name__}")
    if not _is_int(ann.get("id")):
        raise _fail(uri, at, "'id' must be an integer")
    if ann["id"] in seen_ids:
        raise _fail(uri, at, f"duplicate annotation id {ann['id']}")
    seen_ids.add(ann["id"])
    if ann.get("image_id") not in images:
        raise _fail(uri, at, f"image_id {ann.get('image_id')!r} is not in 'images'")
    if ann.get("category_id") not in categories:
        raise _fail(uri, at, f"category_id {ann.get('category_id')!r} is not in 'categories'")
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise _fail(uri, at, f"'bbox' must be 4 finite numbers [x, y, width, height], got {bbox!r}")
    if "segmentation" not in ann:
        raise _fail(uri, at, "no 'segmentation'; Mask R-CNN needs a polygon or RLE mask per instance")
    if ann.get("iscrowd", 0) not in (0, 1):
        raise _fail(uri, at, f"'iscrowd' must be 0 or 1, got {ann.get('iscrowd')!r}")
    if "area" in ann and not _is_number(ann["area"]):
        raise _fail(uri, at, f"'area' must be a finite number, got {ann['area']!r}")
    if ann.get("keypoints"):  # an empty list: no keypoints, as a missing one
        _check_keypoints(uri, ann["keypoints"], at, num_keypoints)
    image = images[ann["image_id"]]
    segmentation = ann["segmentation"]
    try:
        if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            _check_runs(segmentation["counts"])
        validate_segmentation(segmentation, image["height"], image["width"])
        if isinstance(segmentation, dict) and isinstance(segmentation["counts"], (str, bytes)):
            item = (at, segmentation["counts"], image["height"], image["width"])
            if rle_strings is None:
                check_rle_strings(uri, [item])
            else:
                rle_strings.append(item)
    except (ValueError, TypeError) as error:
        raise _fail(uri, at, f"bad segmentation: {error}") from None


# Characters of compressed RLE strings read at once by check_rle_strings (int64 working arrays:
# about 8 bytes each, several times over).
RLE_CHUNK_CHARS = 1 << 23


def check_rle_strings(uri: str, items: list) -> None:
    """Compressed RLE strings (``items``: (``at``, counts, its image's height, width) each, as
    ``check_annotation`` collects them) read as pycocotools reads them, a few million characters
    at a time: AnnotationError naming the first that is no such string (``rle_strings_runs``) or
    whose runs do not cover its image's pixels."""
    start = 0
    while start < len(items):
        stop, chars = start, 0
        while stop < len(items) and (stop == start or chars + len(items[stop][1]) <= RLE_CHUNK_CHARS):
            chars += len(items[stop][1])
            stop += 1
        chunk = items[start:stop]
        try:
            runs, offsets = rle_strings_runs([counts for _, counts, _, _ in chunk])
        except RLEStringError as error:
            raise _fail(uri, chunk[error.string][0], f"bad segmentation: {error}") from None
        total = np.concatenate(([0], np.cumsum(runs)))
        covered = total[offsets[1:]] - total[offsets[:-1]]
        expected = np.array([height * width for _, _, height, width in chunk], dtype=np.int64)
        wrong = np.flatnonzero(covered != expected)
        if wrong.size:
            at, _, height, width = chunk[int(wrong[0])]
            raise _fail(uri, at, f"bad segmentation: compressed RLE counts cover {int(covered[wrong[0]])} pixels, expected "
                                 f"{height * width} (its size {height} x {width})")
        start = stop


def _check_runs(counts: list) -> None:
    """Uncompressed RLE counts: run lengths, each a non-negative integer (pycocotools reads them
    as unsigned 32-bit: a negative one overflows)."""
    for k, run in enumerate(counts):  # a float of an integer value passes, as pycocotools takes it
        if not (_is_int(run) or (isinstance(run, float) and run.is_integer())) or run < 0:
            raise ValueError(f"uncompressed RLE counts must be non-negative integers, got {run!r} at counts[{k}]")


class RLEStringError(ValueError):
    """A compressed RLE string that is no such string; ``string``: its index in the batch."""

    def __init__(self, message: str, string: int):
        super().__init__(message)
        self.string = string


def rle_string_runs(counts: str | bytes) -> np.ndarray:
    """The run lengths (int64) that one compressed RLE's ``counts`` string holds
    (``rle_strings_runs``); ValueError when it is no such string."""
    return rle_strings_runs([counts])[0]


def rle_strings_runs(strings: list) -> tuple[np.ndarray, np.ndarray]:
    """The run lengths (int64) that compressed RLE ``counts`` strings hold, read as pycocotools'
    ``rleFrString`` reads them (6 bits a character from '0', 5 of value and one "more" bit; a
    run's last character's 0x10 its sign; from the fourth run on, a run is the difference from
    the run two before it), all at once, no mask decoded: the runs of every string one after
    another, and ``offsets`` (string k's runs are ``runs[offsets[k]:offsets[k + 1]]``). Raises
    RLEStringError on the first that is no such string: a character outside '0'..'o', a run cut
    off at its end, a run that comes out negative (which pycocotools would wrap to some 4 billion
    pixels)."""
    encoded = []
    for k, counts in enumerate(strings):
        try:
            encoded.append(counts.encode("ascii") if isinstance(counts, str) else bytes(counts))
        except UnicodeEncodeError:
            raise RLEStringError("compressed RLE counts must be an ASCII string of '0'..'o'", k) from None
    lengths = np.array([len(raw) for raw in encoded], dtype=np.int64)
    string_starts = np.concatenate(([0], np.cumsum(lengths)))
    codes = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int16) - 48  # small ints: cheap per character
    bad = np.flatnonzero((codes < 0) | (codes > 63))
    if bad.size:
        k = int(np.searchsorted(string_starts, bad[0], side="right")) - 1
        at = int(bad[0] - string_starts[k])
        raise RLEStringError(
            f"compressed RLE counts have {chr(encoded[k][at])!r} at character {at}, not a COCO RLE string (characters '0'..'o')", k)
    more = codes >= 32  # the 0x20 bit: the run goes on in the next character
    last = string_starts[1:][lengths > 0] - 1  # each string's last character ends its last run
    cut = np.flatnonzero(more[last])
    if cut.size:
        raise RLEStringError("compressed RLE counts end inside a run: the string is cut off", int(np.flatnonzero(lengths > 0)[cut[0]]))
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1)).astype(np.int64) if ends.size else np.zeros(0, dtype=np.int64)
    run_lengths = ends - starts + 1
    string_of_run = np.searchsorted(string_starts, starts, side="right") - 1
    offsets = np.searchsorted(string_of_run, np.arange(len(strings) + 1), side="left")
    longest = int(run_lengths.max()) if run_lengths.size else 0
    if longest > 7:  # 35 bits: past any run of an image pycocotools can hold
        k = int(string_of_run[np.argmax(run_lengths > 7)])
        raise RLEStringError(f"compressed RLE counts hold a run of {longest} characters, not a COCO RLE string", k)
    # a run's value: 5 bits a character, its first character lowest; by character place within
    # the runs (at most 7), not by character, so the 64-bit work is per run
    low = codes & 0x1F
    values = low[starts].astype(np.int64)
    for place in range(1, longest):
        longer = np.flatnonzero(run_lengths > place)
        values[longer] |= low[starts[longer] + place].astype(np.int64) << (5 * place)
    signed = np.flatnonzero(codes[ends] & 0x10)
    values[signed] -= np.left_shift(np.int64(1), 5 * run_lengths[signed])  # sign-extended
    # run m > 2 of a string is stored as the difference from its run m - 2: a cumulative sum over
    # each string's odd runs, and over its even runs from the third on
    position = np.arange(values.size) - offsets[string_of_run]
    runs = values.copy()
    for parity, first in ((1, 1), (0, 2)):
        chosen = np.flatnonzero((position % 2 == parity) & (position >= first))
        if chosen.size:
            summed = np.cumsum(values[chosen])
            group = string_of_run[chosen]
            begins = np.flatnonzero(np.concatenate(([True], group[1:] != group[:-1])))
            before = np.where(begins > 0, summed[begins - 1], 0)
            runs[chosen] = summed - np.repeat(before, np.diff(np.concatenate((begins, [chosen.size]))))
    negative = np.flatnonzero(runs < 0)
    if negative.size:
        k = int(string_of_run[negative[0]])
        raise RLEStringError(
            f"compressed RLE counts decode to a negative run ({int(runs[negative[0]])}) at run {int(position[negative[0]])}", k)
    return runs, offsets


def _check_keypoints(uri: str, keypoints: Any, at: str, count: int) -> None:
    if count == 0:
        raise _fail(uri, at, "has 'keypoints' but no category names keypoints (a category's 'keypoints' list)")
    if not isinstance(keypoints, list) or len(keypoints) != 3 * count or not all(_is_number(v) for v in keypoints):
        length = len(keypoints) if isinstance(keypoints, list) else type(keypoints).__name__
        raise _fail(uri, at, f"'keypoints' must be {3 * count} finite numbers (x, y, v for each of {count} keypoints), got {length}")
    if any(v not in (0, 1, 2) for v in keypoints[2::3]):
        raise _fail(uri, at, f"keypoint visibilities must be 0, 1 or 2, got {sorted(set(keypoints[2::3]))}")


class DegenerateAnnotationWarning(UserWarning):
    """Annotations left out of training targets because their box or mask is empty (or their
    polygons have fewer than 3 points), and polygons of fewer than 3 points that others lose."""


def _examples(ats: list[str]) -> str:
    unique = list(dict.fromkeys(ats))
    return ", ".join(unique[:3]) + (", ..." if len(unique) > 3 else "")


# Reasons an annotation has no mask: its segmentation is [] (a box-only export) or its polygons
# enclose nothing. Evaluation scores such an annotation's box but leaves it out of mask AP.
NO_MASK = ("an empty segmentation", "no polygon of 3 or more points")


def degenerate_message(uri: str, dropped: dict[str, list[str]], short_polygons: list[str], maskless_crowds: list[str]) -> str:
    """One line: the annotations left out of the targets by reason, the polygons of fewer than 3
    points that kept annotations lose, and the crowd regions without a mask, each with examples
    (always saying "degenerate annotations": jobs/training/resume.py's workers filter on it, the
    driver having said it)."""
    parts = []
    if dropped:
        total = sum(len(ats) for ats in dropped.values())
        reasons = "; ".join(f"{len(ats)} with {reason}, e.g. {_examples(ats)}" for reason, ats in dropped.items())
        maskless = sum(len(dropped.get(reason, [])) for reason in NO_MASK)
        stay = "they stay in the evaluation ground truth"
        if maskless:
            stay += f", the {maskless} without a mask for box AP only (mask AP leaves them out: it has no mask to score)"
        parts.append(f"dropped {total} degenerate annotations in {uri} ({reasons}); {stay}")
    if short_polygons:
        parts.append(
            f"ignored {len(short_polygons)} polygons of fewer than 3 points (they enclose nothing) in "
            f"{uri}, e.g. in {_examples(short_polygons)}; these partly degenerate annotations keep their other polygons"
        )
    if maskless_crowds:
        parts.append(
            f"{len(maskless_crowds)} crowd regions without a mask (no polygon of 3 or more points) in {uri}, e.g. "
            f"{_examples(maskless_crowds)}: degenerate annotations that mask AP leaves out (box AP keeps them)"
        )
    return "; ".join(parts)


def has_no_mask(segmentation: Any) -> bool:
    """Polygons (checked) none of which has 3 points: nothing to rasterize."""
    return isinstance(segmentation, list) and all(len(polygon) < 6 for polygon in segmentation)
