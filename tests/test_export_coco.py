"""jobs.export_coco: a labeling output -> COCO results / a COCO annotation file for labeling tools."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jobs.common import run_main
from jobs.export_coco import main as export_main
from jobs.labeling.plan import write_plan
from jobs.labeling.shards import part_name
from jobs.labeling.rows import OUTPUT_SCHEMA
from maskrcnn.masks import decode_masks, encode_masks

CATEGORIES = {1: "circle", 2: "square"}


def _instance(mask: np.ndarray, category_id: int, score: float) -> dict:
    ys, xs = np.nonzero(mask)
    x0, y0 = float(xs.min()), float(ys.min())
    return {
        "category_id": category_id,
        "category": CATEGORIES[category_id],
        "score": score,
        "bbox": [x0, y0, float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)],
        "area": int(mask.sum()),
        "mask": encode_masks(mask[None])[0],
    }


@pytest.fixture
def label_output(tmp_path):
    """A labeling output of 5 images in 3 part files: 3 with instances, 1 with none, 1 failed."""
    root = "/data/images"
    uris = [f"{root}/s0/a.png", f"{root}/s0/b.png", f"{root}/s1/c.png", f"{root}/s1/d.jpg", f"{root}/s2/bad.png"]
    out = str(tmp_path / "labels")
    write_plan(iter(uris), out, root, shard_size=2, settings={})
    masks = {}
    rows = []
    rng = np.random.default_rng(0)
    for k, uri in enumerate(uris):
        if uri.endswith("bad.png"):
            error = "truncated or corrupt image"
            rows.append({"image_uri": uri, "width": None, "height": None, "instances": [], "error": error, "model": "sha256:x"})
            continue
        height, width = 40 + k, 50
        instances = []
        if not uri.endswith("d.jpg"):
            for j in range(2):
                mask = np.zeros((height, width), dtype=np.uint8)
                y, x = rng.integers(0, 20, size=2)
                mask[y : y + 15, x : x + 10 + 5 * j] = 1
                instances.append(_instance(mask, 1 + j, 0.9 - 0.3 * j))
                masks[(uri, j)] = mask
        rows.append({"image_uri": uri, "width": width, "height": height, "instances": instances, "error": None, "model": "sha256:x"})
    for shard in range(3):
        table = pa.Table.from_pylist(rows[2 * shard : 2 * shard + 2], schema=OUTPUT_SCHEMA)
        pq.write_table(table, f"{out}/{part_name(shard)}")
    return out, rows, masks


def test_annotations_file_loads_in_pycocotools_with_relative_names(label_output, tmp_path, capsys):
    out, rows, masks = label_output
    path = str(tmp_path / "review.json")
    assert export_main(["--input", out, "--output", path, "--format", "annotations"]) == 0
    coco = COCO(path)
    images = sorted(coco.imgs.values(), key=lambda i: i["id"])
    assert [i["file_name"] for i in images] == ["s0/a.png", "s0/b.png", "s1/c.png", "s1/d.jpg"]  # the failed one left out
    assert [(i["width"], i["height"]) for i in images] == [(50, 40), (50, 41), (50, 42), (50, 43)]
    assert coco.loadCats(coco.getCatIds()) == [
        {"id": 1, "name": "circle", "supercategory": ""},
        {"id": 2, "name": "square", "supercategory": ""},
    ]
    assert len(coco.anns) == 6
    for image in images:
        uri = f"/data/images/{image['file_name']}"
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        for j, ann in enumerate(anns):
            assert ann["iscrowd"] == 0 and ann["category_id"] == 1 + j
            np.testing.assert_array_equal(coco.annToMask(ann), masks[(uri, j)])
            assert ann["area"] == int(masks[(uri, j)].sum())
    assert "1 images that failed" in capsys.readouterr().err


def test_results_match_the_annotations_perfectly(label_output, tmp_path):
    out, _, _ = label_output
    annotations, results = str(tmp_path / "a.json"), str(tmp_path / "r.json")
    assert export_main(["--input", out, "--output", annotations, "--format", "annotations"]) == 0
    assert export_main(["--input", out, "--output", results]) == 0
    detections = json.load(open(results))
    assert len(detections) == 6 and set(detections[0]) == {"image_id", "category_id", "segmentation", "bbox", "score"}
    gt = COCO(annotations)
    evaluator = COCOeval(gt, gt.loadRes(results), "segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_results_take_image_ids_from_a_ground_truth_file(label_output, tmp_path):
    out, _, _ = label_output
    gt = {"images": [{"id": 70, "file_name": "s0/b.png"}, {"id": 90, "file_name": "./s1/c.png"}], "annotations": [], "categories": []}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    results = str(tmp_path / "r.json")
    assert export_main(["--input", out, "--output", results, "--annotations", str(tmp_path / "gt.json"), "--min-score", "0.8"]) == 0
    detections = json.load(open(results))
    assert sorted(d["image_id"] for d in detections) == [70, 90]  # a.png is not in gt; score 0.6 ones dropped
    assert all(decode_masks([d["segmentation"]]).shape[0] == 1 for d in detections)


def test_images_root_option_and_bad_input(label_output, tmp_path, capsys):
    out, _, _ = label_output
    path = str(tmp_path / "a.json")
    assert export_main(["--input", out, "--output", path, "--format", "annotations", "--images-root", "/data"]) == 0
    assert json.load(open(path))["images"][0]["file_name"] == "images/s0/a.png"
    assert "--images-root" not in capsys.readouterr().err
    # a root the images are not under: full URIs, said in one line
    assert export_main(["--input", out, "--output", path, "--format", "annotations", "--images-root", "/elsewhere"]) == 0
    images = json.load(open(path))["images"]
    assert images[0]["file_name"] == "/data/images/s0/a.png"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"warning: {len(images)} images are not under --images-root /elsewhere: their file_name is their whole URI")
    with pytest.raises(SystemExit) as exit_info:
        run_main(export_main, ["--input", str(tmp_path / "nothing"), "--output", path])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_results_carry_their_image_numbering_beside_them(label_output, tmp_path):
    """Numbered here (no --annotations), results say which file each image id is: results.json
    gets results.images.json, a COCO file with the images and categories that loadRes takes."""
    out, rows, masks = label_output
    results = tmp_path / "r.json"
    assert export_main(["--input", out, "--output", str(results)]) == 0
    sidecar = tmp_path / "r.images.json"
    coco = COCO(str(sidecar))
    assert [(i["file_name"], i["width"], i["height"]) for i in sorted(coco.imgs.values(), key=lambda i: i["id"])] == [
        ("s0/a.png", 50, 40), ("s0/b.png", 50, 41), ("s1/c.png", 50, 42), ("s1/d.jpg", 50, 43)]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["circle", "square"]
    detected = coco.loadRes(str(results))  # the results stay a plain list that loadRes reads
    assert isinstance(json.load(open(results)), list) and len(detected.anns) == 6
    for ann in detected.anns.values():
        uri = f"/data/images/{detected.imgs[ann['image_id']]['file_name']}"
        np.testing.assert_array_equal(detected.annToMask(ann), masks[(uri, ann["category_id"] - 1)])
    # with --annotations the ids are that file's own: nothing to write beside
    gt = {"images": [{"id": 70, "file_name": "s0/b.png"}], "annotations": [], "categories": []}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    assert export_main(["--input", out, "--output", str(tmp_path / "g.json"), "--annotations", str(tmp_path / "gt.json")]) == 0
    assert not (tmp_path / "g.images.json").exists()


def test_an_image_listed_twice_is_exported_once_from_its_first_row(tmp_path, capsys):
    """A manifest line is a request: a URI listed twice is planned (and labelled) twice, two rows.
    The COCO files list the image once, with the first row's detections."""
    uris = ["/m/a.png", "/m/b.png", "/m/a.png", "/m/c.png", "/m/a.png"]
    out = str(tmp_path / "labels")
    plan = write_plan(iter(uris), out, str(tmp_path / "manifest.txt"), shard_size=2, settings={})
    assert plan.num_images == 5
    rng = np.random.default_rng(1)
    rows, first_a = [], None
    for k, uri in enumerate(uris):
        mask = np.zeros((30, 40), dtype=np.uint8)
        y, x = rng.integers(0, 15, size=2)
        mask[y : y + 10, x : x + 5 + k] = 1
        if uri == "/m/a.png" and first_a is None:
            first_a = mask
        count = 1 if k != 2 else 3  # the second a.png row has other detections
        instances = [_instance(mask, 1, 0.9)] * count
        rows.append({"image_uri": uri, "width": 40, "height": 30, "instances": instances, "error": None, "model": "sha256:x"})
    for shard in range(3):
        pq.write_table(pa.Table.from_pylist(rows[2 * shard : 2 * shard + 2], schema=OUTPUT_SCHEMA), f"{out}/{part_name(shard)}")

    review, results = tmp_path / "review.json", tmp_path / "r.json"
    assert export_main(["--input", out, "--output", str(review), "--format", "annotations"]) == 0
    assert "2 rows repeat an image URI" in capsys.readouterr().err
    document = json.loads(review.read_text())
    assert [(i["id"], i["file_name"]) for i in document["images"]] == [(1, "/m/a.png"), (2, "/m/b.png"), (3, "/m/c.png")]
    assert [a["image_id"] for a in document["annotations"]] == [1, 2, 3]
    coco = COCO(str(review))
    np.testing.assert_array_equal(coco.annToMask(coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]), first_a)

    assert export_main(["--input", out, "--output", str(results)]) == 0
    assert "2 rows repeat an image URI" in capsys.readouterr().err
    sidecar = json.loads((tmp_path / "r.images.json").read_text())
    assert [i["file_name"] for i in sidecar["images"]] == ["/m/a.png", "/m/b.png", "/m/c.png"]
    assert [d["image_id"] for d in json.loads(results.read_text())] == [1, 2, 3]
