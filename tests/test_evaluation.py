"""maskrcnn.evaluation against pycocotools' COCOeval: perfect, empty and imperfect predictions."""

from __future__ import annotations

import logging

import pytest
import torch

from maskrcnn.data import CocoDataset
from maskrcnn.data.synthetic import make_sample_dataset
from maskrcnn.evaluation import STAT_NAMES, evaluate_coco, evaluate_model, predictions_to_coco_results
from maskrcnn.modeling.meta_arch import size_groups

HEADLINES = ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    annotations, images = make_sample_dataset(str(out), {"val": 12}, seed=5)["val"]
    return CocoDataset(annotations, images)


def _ground_truth_predictions(dataset):
    predictions, image_ids = [], []
    for index in range(len(dataset)):
        _, target = dataset[index]
        count = len(target["boxes"])
        predictions.append(
            {
                "boxes": target["boxes"],
                "scores": torch.linspace(0.9, 0.5, count),
                "labels": target["labels"],
                "masks": target["masks"].bool(),
            }
        )
        image_ids.append(target["image_id"])
    return predictions, image_ids


def test_results_format():
    prediction = {
        "boxes": torch.tensor([[1.0, 2.0, 4.0, 7.0]]),
        "scores": torch.tensor([0.75]),
        "labels": torch.tensor([2]),
        "masks": torch.zeros(1, 1, 8, 6),  # (N, 1, H, W) probabilities are accepted too
    }
    prediction["masks"][0, 0, 2:7, 1:4] = 0.9
    (result,) = predictions_to_coco_results([prediction], [42], {1: 5, 2: 9})
    assert result["image_id"] == 42 and result["category_id"] == 9 and result["score"] == 0.75
    assert result["bbox"] == [1.0, 2.0, 3.0, 5.0]  # x, y, w, h
    assert result["segmentation"]["size"] == [8, 6] and isinstance(result["segmentation"]["counts"], str)
    assert predictions_to_coco_results([prediction], [42])[0]["category_id"] == 2  # identity
    assert predictions_to_coco_results([{**prediction, "boxes": torch.zeros(0, 4)}], [42]) == []
    no_masks = {k: v for k, v in prediction.items() if k != "masks"}
    assert "segmentation" not in predictions_to_coco_results([no_masks], [42], [0, 5, 9])[0]


def test_perfect_predictions_score_one(dataset):
    predictions, image_ids = _ground_truth_predictions(dataset)
    results = predictions_to_coco_results(predictions, image_ids, dataset.class_to_category_id)
    metrics = evaluate_coco(dataset.coco, results)
    for key in HEADLINES:
        assert metrics[key] == pytest.approx(1.0), key
    assert len(metrics["bbox_stats"]) == len(metrics["segm_stats"]) == len(STAT_NAMES) == 12


def test_empty_predictions_score_zero(dataset, capsys):
    metrics = evaluate_coco(dataset.coco, [])
    assert all(metrics[key] == 0.0 for key in HEADLINES)
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 5, 5, dtype=torch.bool)}] * len(dataset)
    results = predictions_to_coco_results(empty, dataset.image_ids, dataset.class_to_category_id)
    assert results == [] and evaluate_coco(dataset.coco, results)["segm_AP"] == 0.0
    assert capsys.readouterr().out == ""


def test_wrong_labels_and_missing_masks(dataset):
    predictions, image_ids = _ground_truth_predictions(dataset)
    # Every label rotated to another class: nothing matches.
    rotated = [{**p, "labels": p["labels"] % 3 + 1} for p in predictions]
    metrics = evaluate_coco(dataset.coco, predictions_to_coco_results(rotated, image_ids, dataset.class_to_category_id))
    assert metrics["bbox_AP"] == 0.0 and metrics["segm_AP"] == 0.0
    # Boxes only: box AP is perfect, mask AP is 0.
    boxes_only = [{k: v for k, v in p.items() if k != "masks"} for p in predictions]
    metrics = evaluate_coco(dataset.coco, predictions_to_coco_results(boxes_only, image_ids, dataset.class_to_category_id))
    assert metrics["bbox_AP"] == pytest.approx(1.0) and metrics["segm_AP"] == 0.0


def test_loose_boxes_pass_iou_half_but_not_three_quarters(dataset):
    predictions, image_ids = _ground_truth_predictions(dataset)
    loose = []
    for p in predictions:
        boxes = p["boxes"].clone()
        size = boxes[:, 2:] - boxes[:, :2]
        boxes[:, 2:] += size * 0.2  # IoU 1 / 1.44 = 0.69 with the ground truth
        loose.append({**p, "boxes": boxes})
    metrics = evaluate_coco(dataset.coco, predictions_to_coco_results(loose, image_ids, dataset.class_to_category_id))
    assert metrics["bbox_AP50"] == pytest.approx(1.0)
    assert metrics["bbox_AP75"] == 0.0
    assert metrics["segm_AP"] == pytest.approx(1.0)  # masks untouched


def test_subset_of_images(dataset):
    predictions, image_ids = _ground_truth_predictions(dataset)
    results = predictions_to_coco_results(predictions[:3], image_ids[:3], dataset.class_to_category_id)
    assert evaluate_coco(dataset.coco, results, image_ids=image_ids[:3])["segm_AP"] == pytest.approx(1.0)
    assert evaluate_coco(dataset.coco, results)["segm_AP"] < 0.6


def test_summary_is_logged_not_printed(dataset, capsys, caplog):
    predictions, image_ids = _ground_truth_predictions(dataset)
    results = predictions_to_coco_results(predictions, image_ids, dataset.class_to_category_id)
    with caplog.at_level(logging.INFO, logger="maskrcnn.evaluation"):
        evaluate_coco(dataset.coco, results, iou_types=("segm",))
    assert capsys.readouterr().out == ""
    assert "Average Precision" in caplog.text


class _Oracle(torch.nn.Module):
    """Returns the ground truth of the images it is shown, whichever they are and in whichever
    order: each image is recognised by its pixels."""

    def __init__(self, dataset, predictions):
        super().__init__()
        self.known = [(dataset[i][0], prediction) for i, prediction in enumerate(predictions)]
        self.calls = []

    def forward(self, images):
        assert not self.training and torch.is_inference_mode_enabled()
        self.calls.append([tuple(image.shape[-2:]) for image in images])
        return [next(p for known, p in self.known if known.shape == image.shape and torch.equal(known, image)) for image in images]


def test_evaluate_model(dataset):
    predictions, _ = _ground_truth_predictions(dataset)
    model = _Oracle(dataset, predictions)
    model.train()
    metrics = evaluate_model(model, dataset, batch_size=5)
    # batches of 5, 5 and 2, each run as one forward per image shape (the oracle has no padded size)
    sizes = [tuple(dataset[i][0].shape[-2:]) for i in range(len(dataset))]
    expected = [[sizes[start + i] for i in group] for start in (0, 5, 10)
                for group in size_groups(sizes[start : min(start + 5, len(sizes))])]
    assert model.calls == expected and sum(map(len, expected)) == len(dataset) == 12
    assert len(set(sizes)) >= 2, "the sample images should be of several sizes"
    for key in HEADLINES:
        assert metrics[key] == pytest.approx(1.0), key
    assert model.training, "the model's mode is restored"
    assert metrics["num_images"] == 12 and metrics["num_detections"] == sum(len(p["labels"]) for p in predictions)


def test_evaluate_model_class_map_and_loader_workers(dataset):
    predictions, _ = _ground_truth_predictions(dataset)
    model = _Oracle(dataset, predictions).eval()
    total = sum(len(p["labels"]) for p in predictions)
    # images read by DataLoader processes: the same images, the same AP
    read_by_workers = evaluate_model(model, dataset, batch_size=4, loader_workers=2)
    assert read_by_workers["num_detections"] == total and read_by_workers["bbox_AP"] == pytest.approx(1.0)
    # a class map without class 1: class 1's detections are dropped, the others keep their categories
    class_map = {k + 1: c["id"] for k, c in enumerate(dataset.categories) if k > 0}
    without_first = sum(int((p["labels"] != 1).sum()) for p in predictions)
    assert 0 < without_first < total
    partial = evaluate_model(model, dataset, batch_size=4, class_map=class_map)
    assert partial["num_detections"] == without_first and 0.0 < partial["bbox_AP"] < 1.0
    # the model's own outputs were left whole
    assert evaluate_model(model, dataset, batch_size=4)["num_detections"] == total
