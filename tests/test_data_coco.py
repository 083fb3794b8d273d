"""maskrcnn.data.coco: reading COCO instances, rejecting malformed files, dropping degenerate ones."""

from __future__ import annotations

import io
import json
import logging
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.data import (
    AnnotationError,
    CocoDataset,
    DegenerateAnnotationWarning,
    ImageDecodeError,
    collate_fn,
    decode_image,
    missing_images,
)
from maskrcnn.masks import encode_masks
from maskrcnn.storage import join_uri

H, W = 8, 10  # image 1; image 2 is 6 x 4


def _rle_mask() -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[4:7, 5:9] = 1  # 12 pixels, box x 5..9, y 4..7
    return mask


def _document() -> dict:
    rle = encode_masks(_rle_mask()[None])[0]
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": W, "height": H},
            {"id": 2, "file_name": "sub/b.png", "width": 4, "height": 6},
        ],
        # Out of order on purpose: class 1 is category 2 ("cat"), class 2 is category 7 ("dog").
        "categories": [{"id": 7, "name": "dog"}, {"id": 2, "name": "cat"}],
        "annotations": [
            # 0: polygon, the square (1, 1)-(4, 4): 9 pixels.
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [1, 1, 3, 3], "area": 9.0, "iscrowd": 0,
             "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]]},
            # 1: compressed RLE (str counts), no 'area' and no 'iscrowd' (filled in).
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [5, 4, 4, 3], "segmentation": rle},
            # 2: crowd, uncompressed RLE: left out of targets, kept in the ground truth.
            {"id": 12, "image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 2], "area": 2.0, "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": [0, 2, H * W - 2]}},
            # 3: degenerate, zero width.
            {"id": 13, "image_id": 1, "category_id": 7, "bbox": [2, 2, 0, 3], "area": 1.0, "iscrowd": 0,
             "segmentation": [[2, 2, 3, 2, 3, 5, 2, 5]]},
            # 4: degenerate, empty mask.
            {"id": 14, "image_id": 2, "category_id": 7, "bbox": [0, 0, 2, 2], "area": 0.0, "iscrowd": 0,
             "segmentation": []},
            # 5: degenerate, negative height.
            {"id": 15, "image_id": 2, "category_id": 2, "bbox": [1, 3, 2, -1], "area": 1.0, "iscrowd": 0,
             "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]]},
            # 6: a box reaching past the image is clipped (image 2 is 4 wide).
            {"id": 16, "image_id": 2, "category_id": 2, "bbox": [2, 1, 5, 2], "area": 4.0, "iscrowd": 0,
             "segmentation": [[2, 1, 4, 1, 4, 3, 2, 3]]},
        ],
    }


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(root, document=None, files=None):
    """Write the annotations and images under ``root``; returns (annotations_uri, images_uri)."""
    document = _document() if document is None else document
    (root / "images" / "sub").mkdir(parents=True, exist_ok=True)
    if files is None:
        files = {
            "a.png": _png(np.full((H, W, 3), 200, dtype=np.uint8)),
            "sub/b.png": _png(np.full((6, 4), 50, dtype=np.uint8)),  # grayscale: converted to RGB
        }
    for name, data in files.items():
        (root / "images" / name).write_bytes(data)
    path = root / "annotations.json"
    path.write_text(json.dumps(document) if isinstance(document, dict) else document)
    return str(path), str(root / "images")


def _load(annotations, images, **kwargs) -> CocoDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateAnnotationWarning)
        return CocoDataset(annotations, images, **kwargs)


def test_targets(tmp_path):
    dataset = _load(*_write(tmp_path))
    assert len(dataset) == 2 and dataset.image_ids == [1, 2]
    assert dataset.categories == [{"id": 2, "name": "cat"}, {"id": 7, "name": "dog"}]
    assert dataset.category_id_to_class == {2: 1, 7: 2}
    assert dataset.class_to_category_id(torch.tensor([2, 1])) == [7, 2]
    assert dataset.class_to_category_id(1) == 2
    assert dataset.num_classes == 3

    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert torch.allclose(image, torch.full_like(image, 200 / 255))
    assert target["image_id"] == 1
    torch.testing.assert_close(target["boxes"], torch.tensor([[1.0, 1, 4, 4], [5, 4, 9, 7]]))
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [2, 1]
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (2, H, W)
    square = np.zeros((H, W), dtype=np.uint8)
    square[1:4, 1:4] = 1
    np.testing.assert_array_equal(target["masks"][0].numpy(), square)
    np.testing.assert_array_equal(target["masks"][1].numpy(), _rle_mask())
    torch.testing.assert_close(target["area"], torch.tensor([9.0, 12.0]))  # 12: filled from the mask
    assert target["iscrowd"].tolist() == [0, 0]

    image, target = dataset[1]
    assert image.shape == (3, 6, 4) and torch.allclose(image, torch.full_like(image, 50 / 255))
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 1, 4, 3]]))
    assert target["masks"].shape == (1, 6, 4) and int(target["masks"].sum()) == 4


def test_crowd_and_degenerate_stay_in_ground_truth(tmp_path):
    dataset = _load(*_write(tmp_path))
    coco = dataset.coco
    assert sorted(coco.getAnnIds()) == [10, 11, 12, 13, 14, 15, 16]
    assert coco.anns[12]["iscrowd"] == 1
    assert coco.anns[11]["iscrowd"] == 0 and coco.anns[11]["area"] == 12.0  # filled for COCOeval


def test_degenerate_annotations_dropped_with_one_counted_warning(tmp_path):
    annotations, images = _write(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = CocoDataset(annotations, images)
    ours = [w for w in caught if issubclass(w.category, DegenerateAnnotationWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert message.startswith(f"dropped 3 degenerate annotations in {annotations}")
    assert "annotations[3] (id 13)" in message
    assert dataset.num_dropped == 3
    # min_area raises the bar: the 9- and 12-pixel masks go too, plus the 4-pixel one.
    with pytest.warns(DegenerateAnnotationWarning, match="dropped 6 degenerate"):
        strict = CocoDataset(annotations, images, min_area=13)
    assert len(strict[0][1]["boxes"]) == 0 and strict[0][1]["masks"].shape == (0, H, W)


def test_no_warning_without_degenerate_annotations(tmp_path):
    document = _document()
    document["annotations"] = [a for a in document["annotations"] if a["id"] not in (13, 14, 15)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateAnnotationWarning)
        dataset = CocoDataset(*_write(tmp_path, document))
    assert dataset.num_dropped == 0


def test_mask_emptier_than_its_area_is_dropped_when_read(tmp_path):
    document = _document()
    # An empty RLE, but the file claims 100 pixels: trusted at load time.
    document["annotations"][0].update(segmentation={"size": [H, W], "counts": [H * W]}, area=100.0)
    dataset = _load(*_write(tmp_path, document))
    _, target = dataset[0]
    assert target["labels"].tolist() == [1]
    assert target["masks"].shape == (1, H, W) and target["boxes"].shape == (1, 4) and target["area"].tolist() == [12.0]


def test_polygons_of_fewer_than_3_points_are_named(tmp_path):
    """A 2-point "polygon" encloses nothing: an annotation with nothing else is dropped as
    degenerate, even where its 'area' says it is large; one that has larger polygons keeps them.
    Both are named in the one counted warning."""
    document = _document()
    document["annotations"][0].update(segmentation=[[1, 1, 4, 4]], area=100.0)
    document["annotations"][6]["segmentation"].append([0, 0, 1, 1])
    annotations, images = _write(tmp_path, document)
    with pytest.warns(DegenerateAnnotationWarning) as caught:
        dataset = CocoDataset(annotations, images)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(f"dropped 4 degenerate annotations in {annotations} (")
    assert "1 with no polygon of 3 or more points, e.g. annotations[0] (id 10)" in message
    assert "1 with an empty segmentation, e.g. annotations[4] (id 14)" in message
    assert "2 with an empty box, e.g. annotations[3] (id 13), annotations[5] (id 15)" in message
    assert f"ignored 1 polygons of fewer than 3 points (they enclose nothing) in {annotations}, e.g. in annotations[6] (id 16)" in message
    assert dataset.num_dropped == 4
    assert dataset[0][1]["labels"].tolist() == [1]  # id 10 left out, id 11 kept
    _, target = dataset[1]
    assert target["labels"].tolist() == [1] and int(target["masks"].sum()) == 4  # id 16: its square
    # only a short polygon beside larger ones: still one warning, the one a training worker filters
    document["annotations"] = [a for a in document["annotations"] if a["id"] not in (10, 13, 14, 15)]
    with pytest.warns(DegenerateAnnotationWarning, match=r"^ignored 1 polygons .*annotations\[2\] \(id 16\).*degenerate annotations"):
        assert CocoDataset(*_write(tmp_path, document)).num_dropped == 0


def _mutated(change):
    def build():
        document = _document()
        change(document)
        return document

    return build


MALFORMED = {
    "not_json": (lambda: "{not json", r"not a JSON file"),
    "not_an_object": (lambda: "[1, 2]", r"expected a JSON object"),
    "no_images": (_mutated(lambda d: d.pop("images")), r"missing 'images'"),
    "no_annotations": (_mutated(lambda d: d.pop("annotations")), r"missing 'annotations'"),
    "no_categories": (_mutated(lambda d: d.pop("categories")), r"missing 'categories'"),
    "images_not_list": (_mutated(lambda d: d.update(images={})), r"'images' must be a list"),
    "empty_categories": (_mutated(lambda d: d.update(categories=[])), r"'categories' is empty"),
    "unknown_image": (
        _mutated(lambda d: d["annotations"][1].update(image_id=99)),
        r"annotations\[1\] \(id 11\): image_id 99 is not in 'images'",
    ),
    "unknown_category": (
        _mutated(lambda d: d["annotations"][6].update(category_id=3)),
        r"annotations\[6\] \(id 16\): category_id 3 is not in 'categories'",
    ),
    "bbox_length": (
        _mutated(lambda d: d["annotations"][0].update(bbox=[1, 1, 3])),
        r"annotations\[0\] \(id 10\): 'bbox' must be 4 finite numbers",
    ),
    "bbox_not_numbers": (
        _mutated(lambda d: d["annotations"][0].update(bbox=[1, "1", 3, 3])),
        r"annotations\[0\] \(id 10\): 'bbox'",
    ),
    "duplicate_annotation_id": (
        _mutated(lambda d: d["annotations"][2].update(id=10)),
        r"annotations\[2\] \(id 10\): duplicate annotation id 10",
    ),
    "annotation_without_id": (
        _mutated(lambda d: d["annotations"][3].pop("id")),
        r"annotations\[3\]: 'id' must be an integer",
    ),
    "no_segmentation": (
        _mutated(lambda d: d["annotations"][0].pop("segmentation")),
        r"annotations\[0\] \(id 10\): no 'segmentation'",
    ),
    "rle_size_mismatch": (
        _mutated(lambda d: d["annotations"][1]["segmentation"].update(size=[5, 5])),
        r"annotations\[1\] \(id 11\): bad segmentation: RLE size \[5, 5\] does not match",
    ),
    "odd_polygon": (
        _mutated(lambda d: d["annotations"][0].update(segmentation=[[1, 1, 4, 1, 4]])),
        r"annotations\[0\] \(id 10\): bad segmentation: .*even number",
    ),
    "rle_negative_run": (  # pycocotools' uint32 would overflow
        _mutated(lambda d: d["annotations"][2]["segmentation"].update(counts=[H * W + 2, -2])),
        r"annotations\[2\] \(id 12\): bad segmentation: uncompressed RLE counts must be non-negative integers, got -2 at counts\[1\]$",
    ),
    "rle_run_not_integer": (
        _mutated(lambda d: d["annotations"][2]["segmentation"].update(counts=[0, 2.5, H * W - 2.5])),
        r"annotations\[2\] \(id 12\): bad segmentation: uncompressed RLE counts must be non-negative integers, got 2.5 at counts\[1\]$",
    ),
    "rle_run_null": (
        _mutated(lambda d: d["annotations"][2]["segmentation"].update(counts=[0, None, H * W])),
        r"annotations\[2\] \(id 12\): bad segmentation: uncompressed RLE counts must be non-negative integers, got None",
    ),
    "rle_string_garbage": (  # pycocotools: "Invalid RLE mask representation", naming nothing
        _mutated(lambda d: d["annotations"][1]["segmentation"].update(counts="!!!!~~~~")),
        r"annotations\[1\] \(id 11\): bad segmentation: compressed RLE counts have '!' at character 0, not a COCO RLE string",
    ),
    "rle_string_negative_run": (  # "e2K": runs 85 and -5, summing to H * W
        _mutated(lambda d: d["annotations"][1]["segmentation"].update(counts="e2K")),
        r"annotations\[1\] \(id 11\): bad segmentation: compressed RLE counts decode to a negative run \(-5\) at run 1$",
    ),
    "rle_string_cut_off": (  # 'a' sets the "more" bit: a run goes on past the end
        _mutated(lambda d: d["annotations"][1]["segmentation"].update(counts=d["annotations"][1]["segmentation"]["counts"] + "a")),
        r"annotations\[1\] \(id 11\): bad segmentation: compressed RLE counts end inside a run",
    ),
    "rle_string_of_another_size": (  # a 6 x 4 mask's string under the 8 x 10 image's size
        _mutated(lambda d: d["annotations"][1]["segmentation"].update(counts=encode_masks(np.ones((1, 6, 4)))[0]["counts"])),
        r"annotations\[1\] \(id 11\): bad segmentation: compressed RLE counts cover 24 pixels, expected 80 \(its size 8 x 10\)$",
    ),
    "rle_empty_string": (
        _mutated(lambda d: d["annotations"][1]["segmentation"].update(counts="")),
        r"annotations\[1\] \(id 11\): bad segmentation: compressed RLE counts cover 0 pixels, expected 80",
    ),
    "bad_iscrowd": (
        _mutated(lambda d: d["annotations"][0].update(iscrowd=2)),
        r"annotations\[0\] \(id 10\): 'iscrowd' must be 0 or 1",
    ),
    "image_without_size": (
        _mutated(lambda d: d["images"][1].pop("width")),
        r"images\[1\] \(id 2\): 'width' must be a positive integer",
    ),
    "duplicate_image_id": (
        _mutated(lambda d: d["images"][1].update(id=1)),
        r"images\[1\] \(id 1\): duplicate image id 1",
    ),
    "category_without_name": (
        _mutated(lambda d: d["categories"][0].pop("name")),
        r"categories\[0\] \(id 7\): 'name' must be a string",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_are_rejected_naming_file_and_entry(tmp_path, case):
    build, pattern = MALFORMED[case]
    annotations, images = _write(tmp_path, build())
    with pytest.raises(AnnotationError, match=pattern) as info:
        _load(annotations, images)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(annotations + ": ")


def test_compressed_rles_of_any_mask_pass_the_check(tmp_path):
    """The check reads a compressed RLE's runs as pycocotools does: every string it writes passes
    (runs of one to four characters, negative differences among them), and decodes to its mask."""
    rng = np.random.default_rng(0)
    height, width = 90, 70
    masks = [rng.random((height, width)) < p for p in (0.05, 0.5, 0.95)]
    for y, x, h, w in ((0, 0, height, width), (1, 2, 3, 4), (40, 10, 50, 60), (0, 69, 90, 1), (89, 0, 1, 70)):
        mask = np.zeros((height, width), dtype=bool)
        mask[y: y + h, x: x + w] = True
        masks.append(mask)
    masks.append(np.zeros((height, width), dtype=bool))
    masks[-1][::7, ::3] = True
    rles = encode_masks(np.stack(masks))
    # and an uncompressed RLE written from floats, as pycocotools takes it: the top row
    masks.append(np.zeros((height, width), dtype=bool))
    masks[-1][0] = True
    rles.append({"size": [height, width], "counts": [0.0] + [1.0, float(height - 1)] * width})
    document = {
        "images": [{"id": 1, "file_name": "a.png", "width": width, "height": height}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, width, height], "iscrowd": 0,
                         "segmentation": rle} for k, rle in enumerate(rles)],
    }
    files = {"a.png": _png(np.zeros((height, width, 3), dtype=np.uint8))}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateAnnotationWarning)
        dataset = CocoDataset(*_write(tmp_path, document, files))
    _, target = dataset[0]
    np.testing.assert_array_equal(target["masks"].numpy(), np.stack(masks).astype(np.uint8))


def test_a_files_rle_strings_are_read_at_once_as_pycocotools_reads_each(monkeypatch):
    """check_rle_strings reads a file's compressed RLEs together, a chunk of characters at a time:
    each string's runs are the ones pycocotools decodes it to, and a bad string in a later chunk
    is named as itself."""
    from pycocotools import mask as mask_utils

    import maskrcnn.data.coco_checks as checks

    rng = np.random.default_rng(3)
    strings, masks = [], []
    for k in range(60):
        height, width = (int(v) for v in rng.integers(1, 60, 2))
        mask = (rng.random((height, width)) < (0.0, 1.0, rng.random())[k % 3]).astype(np.uint8)
        masks.append(mask)
        strings.append(encode_masks(mask[None])[0]["counts"])
    runs, offsets = checks.rle_strings_runs(strings)
    for k, mask in enumerate(masks):  # the runs, expanded, are the mask in column order
        values = np.repeat(np.arange(offsets[k + 1] - offsets[k]) % 2, runs[offsets[k]:offsets[k + 1]])
        decoded = mask_utils.decode({"size": list(mask.shape), "counts": strings[k]})
        np.testing.assert_array_equal(values, decoded.flatten(order="F"))
    monkeypatch.setattr(checks, "RLE_CHUNK_CHARS", 50)  # many chunks
    items = [(f"annotations[{k}]", counts, *mask.shape) for k, (counts, mask) in enumerate(zip(strings, masks))]
    checks.check_rle_strings("a.json", items)
    items[41] = ("annotations[41]", strings[41][:-1] + "!", *masks[41].shape)
    with pytest.raises(AnnotationError, match=r"^a\.json: annotations\[41\]: bad segmentation: compressed RLE counts have '!'"):
        checks.check_rle_strings("a.json", items)


def test_annotations_without_a_mask_count_for_box_ap_not_mask_ap(tmp_path, caplog):
    """A segmentation [] (box-only exports) or polygons of fewer than 3 points: no mask to train
    or score. Training leaves such an annotation out; evaluation scores its box and leaves it out
    of mask AP (pycocotools would crash on []), a crowd region too, with a counted warning."""
    from maskrcnn.evaluation import evaluate_coco, predictions_to_coco_results

    document = _document()
    document["annotations"] = [a for a in document["annotations"] if a["id"] not in (13, 15)]  # no empty boxes
    document["annotations"][-1]["segmentation"].append([0, 0, 1, 1])  # id 16: a 2-point polygon beside its square
    document["annotations"][-1]["bbox"] = [2, 1, 2, 2]  # ... and its box within the image, as the prediction's
    document["annotations"].append(  # a crowd region without a mask
        {"id": 17, "image_id": 2, "category_id": 2, "bbox": [0, 3, 4, 3], "area": 12.0, "iscrowd": 1, "segmentation": []}
    )
    annotations, images = _write(tmp_path, document)
    with pytest.warns(DegenerateAnnotationWarning) as caught:
        dataset = CocoDataset(annotations, images)
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(
        f"dropped 1 degenerate annotations in {annotations} (1 with an empty segmentation, e.g. annotations[3] (id 14)); they stay "
        "in the evaluation ground truth, the 1 without a mask for box AP only (mask AP leaves them out: it has no mask to score)"
    )
    assert f"1 crowd regions without a mask (no polygon of 3 or more points) in {annotations}, e.g. annotations[5] (id 17)" in message
    assert sorted(dataset.coco.getAnnIds()) == [10, 11, 12, 14, 16, 17]
    # perfect predictions of what training sees: ids 10, 11 and 16 (id 14 missed)
    predictions, image_ids = [], []
    for index in range(len(dataset)):
        _, target = dataset[index]
        count = len(target["boxes"])
        predictions.append({"boxes": target["boxes"], "scores": torch.linspace(0.9, 0.5, count), "labels": target["labels"],
                            "masks": target["masks"].bool()})
        image_ids.append(target["image_id"])
    results = predictions_to_coco_results(predictions, image_ids, dataset.class_to_category_id)
    with caplog.at_level(logging.WARNING, logger="maskrcnn.evaluation"):
        metrics = evaluate_coco(dataset.coco, results)
    assert metrics["segm_AP"] == pytest.approx(1.0)  # id 14 is not in the mask ground truth
    assert metrics["bbox_AP"] < 0.9  # but its box is, and was missed: the dog's recall is 1/2
    assert metrics["bbox_stats"][8] == pytest.approx(0.75)  # AR100: cat 2 of 2, dog 1 of 2
    assert [r.getMessage() for r in caplog.records] == [
        "mask AP leaves out 2 ground-truth annotations without a mask (a segmentation [] or no polygon of 3 or more points), "
        "e.g. ids 14, 17; box AP keeps them"
    ]
    assert dataset.coco.anns[16]["segmentation"][-1] == [0, 0, 1, 1]  # the dataset's ground truth is not changed


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        CocoDataset(str(tmp_path / "absent.json"), str(tmp_path))


def test_image_size_disagreeing_with_file_is_an_error(tmp_path):
    document = _document()
    document["images"][1].update(width=6, height=4)  # b.png is 4 wide, 6 high
    for ann in document["annotations"]:
        if ann["image_id"] == 2:
            ann["segmentation"] = []
    dataset = _load(*_write(tmp_path, document))
    with pytest.raises(AnnotationError, match=r"image id 2 \(sub/b.png\) decodes to 4x6"):
        dataset[1]


def test_images_the_labeler_refuses_are_refused_naming_the_file(tmp_path):
    from tests.labeling_helpers import awkward_images

    # jobs.label's refusals (decode.prepare_image adds "too thin", a resize limit, not a decode one)
    refused = {name: (data, word) for name, (data, word, _) in awkward_images().items() if word not in (None, "too thin")}
    assert len(refused) >= 5
    document = _document()
    document["annotations"] = [a for a in document["annotations"] if a["image_id"] == 1]
    document["images"] = [document["images"][0]]
    for number, name in enumerate(refused, start=100):
        document["images"].append({"id": number, "file_name": name, "width": W, "height": H})
    (tmp_path / "images" / "bad").mkdir(parents=True)
    annotations, images = _write(tmp_path, document, {"a.png": _png(np.full((H, W, 3), 200, dtype=np.uint8)),
                                                      **{name: data for name, (data, _) in refused.items()}})
    dataset = _load(annotations, images)
    assert dataset[0][0].shape == (3, H, W)
    for index, (name, (_, word)) in enumerate(refused.items(), start=1):
        with pytest.raises(ImageDecodeError, match=word) as info:
            dataset[index]
        message = str(info.value)
        assert message.startswith(f"{annotations}: image id {99 + index} ({name}): ") and dataset.image_uri(index) in message, message
    # the limit is the dataset's: an ordinary image over it is refused too
    small_limit = _load(annotations, images, max_pixels=H * W - 1)
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        small_limit[0]


def test_exif_orientation_is_applied():
    # Stored 10 wide x 6 high with "rotate 90 CW" in EXIF: a viewer shows 6 wide x 10 high.
    stored = np.zeros((6, 10, 3), dtype=np.uint8)
    stored[:, :5] = 255  # left half white
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    decoded = decode_image(buffer.getvalue())
    assert decoded.shape == (3, 10, 6)
    # Rotated 90 degrees clockwise, the white left half becomes the top half.
    assert decoded[:, :5].min() == 1.0 and decoded[:, 5:].max() == 0.0


def test_transforms_and_collate(tmp_path):
    calls = []

    def record(image, target):
        calls.append(target["image_id"])
        return image * 0, target

    dataset = _load(*_write(tmp_path), transforms=record)
    images, targets = collate_fn([dataset[0], dataset[1]])
    assert calls == [1, 2]
    assert isinstance(images, list) and isinstance(targets, list)
    assert [i.shape[-2:] for i in images] == [(H, W), (6, 4)] and images[0].sum() == 0
    assert CocoDataset.collate_fn is collate_fn


def test_dataset_pickles_for_dataloader_workers(tmp_path):
    import pickle

    dataset = _load(*_write(tmp_path))
    clone = pickle.loads(pickle.dumps(dataset))
    torch.testing.assert_close(clone[0][1]["boxes"], dataset[0][1]["boxes"])


def test_missing_images(tmp_path):
    annotations, images = _write(tmp_path)
    dataset = _load(annotations, images)
    assert missing_images(dataset) == []
    (tmp_path / "images" / "sub" / "b.png").unlink()
    assert missing_images(dataset) == ["sub/b.png"]
    assert missing_images(_load(annotations, str(tmp_path / "nowhere"))) == ["a.png", "sub/b.png"]


def test_reads_from_s3(tmp_path, s3_bucket):
    """The same dataset, uploaded with s3fs, reads the same through s3:// URIs."""
    import s3fs

    annotations, images = _write(tmp_path / "local")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # endpoint and keys from the AWS variables
    remote = join_uri(s3_bucket, "coco")
    fs.put(str(tmp_path / "local") + "/", remote, recursive=True)
    remote_annotations = join_uri(remote, "annotations.json")
    remote_images = join_uri(remote, "images")

    local_dataset = _load(annotations, images)
    s3_dataset = _load(remote_annotations, remote_images)
    assert s3_dataset.categories == local_dataset.categories
    for index in range(len(local_dataset)):
        local_image, local_target = local_dataset[index]
        s3_image, s3_target = s3_dataset[index]
        torch.testing.assert_close(s3_image, local_image)
        for key in ("boxes", "labels", "masks", "area", "iscrowd"):
            torch.testing.assert_close(s3_target[key], local_target[key])
    assert missing_images(s3_dataset) == []
    fs.rm(join_uri(remote_images, "a.png"))
    assert missing_images(s3_dataset) == ["a.png"]


def test_decode_image_scales_16_bit_instead_of_clipping():
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.array([[0, 1000, 30000, 65535]], dtype=np.uint16)).save(buffer, "PNG")
    decoded = decode_image(buffer.getvalue())
    assert decoded.shape == (3, 1, 4)
    torch.testing.assert_close(decoded[0, 0], torch.tensor([0, 1000, 30000, 65535]) / 65535.0)


def test_decode_image_float_pixels_that_are_not_numbers_do_not_spoil_the_image():
    """A float TIFF's NaN ("no data") pixels are black and its infinities the range's ends; the
    other pixels keep the scale of the finite values (one NaN made every pixel NaN, and the model
    then found nothing in the image)."""
    import io

    import numpy as np
    from PIL import Image

    values = np.array([[0.0, 0.25, np.nan, 1.0, np.inf, -np.inf, 0.5]], dtype=np.float32)
    buffer = io.BytesIO()
    Image.fromarray(values, "F").save(buffer, "TIFF")
    decoded = decode_image(buffer.getvalue())
    assert decoded.shape == (3, 1, 7)
    torch.testing.assert_close(decoded[1, 0], torch.tensor([0.0, 0.25, 0.0, 1.0, 1.0, 0.0, 0.5]))
    buffer = io.BytesIO()
    Image.fromarray(values * 1000, "F").save(buffer, "TIFF")  # finite values up to 1000: 16-bit's range
    torch.testing.assert_close(decode_image(buffer.getvalue())[2, 0], torch.tensor([0, 250, 0, 1000, 65535, 0, 500]) / 65535.0)
