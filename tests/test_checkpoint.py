"""The single-file checkpoint: round trip (local and S3), torchvision state dicts, clear errors."""

import dataclasses
import json

import pytest
import torch

from maskrcnn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, to_torchvision_state_dict
from maskrcnn.config import get_preset
from maskrcnn.modeling import build_model

CATEGORIES = [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}, {"id": 9, "name": "triangle"}]


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    cfg = get_preset("small", num_classes=4)
    return build_model(cfg).eval(), cfg


def _outputs(model, image):
    model.roi_heads.score_thresh = 0.0
    with torch.inference_mode():
        return model([image])[0]


def test_round_trip_local(tmp_path, small_model):
    model, cfg = small_model
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, model, cfg, CATEGORIES)
    # readable by plain torch with weights_only
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "maskrcnn-ray/1" and raw["categories"] == CATEGORIES
    loaded = load_checkpoint(path)
    assert loaded.config == cfg
    assert loaded.label_map == {1: CATEGORIES[0], 2: CATEGORIES[1], 3: CATEGORIES[2]}
    assert loaded.model_hash.startswith("sha256:")
    image = torch.rand(3, 100, 120)
    a, b = _outputs(model, image), _outputs(loaded.model, image)
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])


def test_size_and_threshold_overrides_at_load(tmp_path, small_model):
    model, cfg = small_model
    cfg = cfg.replace(input=dataclasses.replace(cfg.input, train_min_sizes=(224, 256)))
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, model, cfg, CATEGORIES)
    assert cfg.with_overrides() == cfg == load_checkpoint(path, overrides={"min_size": None, "score_thresh": None}).config
    # max_size alone keeps min_size and the training sizes; min_size is the one training size
    assert cfg.with_overrides(max_size=500).input == dataclasses.replace(cfg.input, max_size=500)
    loaded = load_checkpoint(path, overrides={"min_size": 96, "max_size": 128, "score_thresh": 0.25, "detections_per_img": 7})
    assert (loaded.config.input.min_size, loaded.config.input.max_size, loaded.config.input.train_min_sizes) == (96, 128, ())
    assert (loaded.config.roi_heads.score_thresh, loaded.config.roi_heads.detections_per_img) == (0.25, 7)
    assert loaded.config.differences(cfg) == [
        "input.max_size: 128 -> 384", "input.min_size: 96 -> 256", "input.train_min_sizes: [] -> [224, 256]",
        "roi_heads.detections_per_img: 7 -> 50", "roi_heads.score_thresh: 0.25 -> 0.05",
    ]
    # the model is built from it
    assert (loaded.model.transform.min_size, loaded.model.transform.max_size, loaded.model.transform.train_min_sizes) == (96, 128, ())
    assert (loaded.model.roi_heads.score_thresh, loaded.model.roi_heads.detections_per_img) == (0.25, 7)


def test_round_trip_s3(s3_bucket, small_model):
    model, cfg = small_model
    uri = f"{s3_bucket}/runs/model.pt"
    save_checkpoint(uri, model, cfg, CATEGORIES)
    loaded = load_checkpoint(uri)
    assert loaded.config == cfg and loaded.uri == uri


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_folder_stands_for_its_model_pt(where, tmp_path, request, small_model):
    """A jobs.train --output (or a Ray Train checkpoint folder) given as the checkpoint reads its
    model.pt (checkpoint.pt); a folder without one, or before its training ended, is one line."""
    model, cfg = small_model
    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    save_checkpoint(f"{base}/run/model.pt", model, cfg, CATEGORIES)
    save_checkpoint(f"{base}/run/ray_train/checkpoint_1/checkpoint.pt", model, cfg, CATEGORIES)
    from maskrcnn.storage import open_uri

    with open_uri(f"{base}/empty/notes.txt", "w") as f:
        f.write("not a model")
    file_hash = load_checkpoint(f"{base}/run/model.pt").model_hash
    for folder in (f"{base}/run", f"{base}/run/", f"{base}/run/ray_train/checkpoint_1"):
        loaded = load_checkpoint(folder)
        assert loaded.config == cfg and loaded.model_hash == file_hash, folder
    for folder in (f"{base}/empty", f"{base}/run/ray_train"):
        with pytest.raises(CheckpointError, match=r"is a folder without model\.pt or checkpoint\.pt: give the checkpoint file"):
            load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(f"{base}/nowhere")


def test_a_checkpoint_being_rewritten_is_never_read_half_written(tmp_path, small_model):
    """A run's model.pt rewritten (a finished jobs.train run again) while another job reads it:
    each read is the whole file or the one before, never a truncated one."""
    import threading

    from maskrcnn.checkpoint import read_checkpoint

    model, cfg = small_model
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, model, cfg, CATEGORIES)
    stop, failures, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            try:
                read_checkpoint(path)
                reads[0] += 1
            except CheckpointError as exc:
                failures.append(str(exc))
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(60):
            save_checkpoint(path, model, cfg, CATEGORIES)
    finally:
        stop.set()
        thread.join()
    assert not failures and reads[0] > 0, (failures[:1], reads)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_same_bytes_same_hash_other_bytes_other_hash(tmp_path, small_model):
    model, cfg = small_model
    save_checkpoint(str(tmp_path / "a.pt"), model, cfg, CATEGORIES)
    save_checkpoint(str(tmp_path / "b.pt"), model, cfg, CATEGORIES)
    assert load_checkpoint(str(tmp_path / "a.pt")).model_hash == load_checkpoint(str(tmp_path / "b.pt")).model_hash
    other = build_model(cfg)
    save_checkpoint(str(tmp_path / "c.pt"), other, cfg, CATEGORIES)
    assert load_checkpoint(str(tmp_path / "c.pt")).model_hash != load_checkpoint(str(tmp_path / "a.pt")).model_hash


def test_bare_torchvision_state_dict(tmp_path, small_model):
    model, cfg = small_model
    path = tmp_path / "tv.pt"
    torch.save(to_torchvision_state_dict(model), path)
    coco = tmp_path / "cats.json"
    coco.write_text(json.dumps({"categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]}))
    with pytest.raises(CheckpointError, match="bare torchvision state dict.*--arch"):
        load_checkpoint(str(path))
    from maskrcnn.checkpoint import categories_from_coco

    loaded = load_checkpoint(str(path), arch="small", categories=categories_from_coco(str(coco)))
    # torchvision's convention: class index == category id
    assert loaded.label_map[2] == {"id": 2, "name": "b"}
    assert loaded.config.num_classes == 4


def test_corrupt_and_missing_files(tmp_path, small_model):
    model, cfg = small_model
    path = tmp_path / "model.pt"
    save_checkpoint(str(path), model, cfg, CATEGORIES)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.pt is not a readable PyTorch file.*truncated or corrupt"):
        load_checkpoint(str(path))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt"):
        load_checkpoint(str(tmp_path / "empty.pt"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    # not a PyTorch file at all, and a whole model pickled (torch.save(model)): one line each, and
    # never torch's advice to load with weights_only=False, which would run the file's code
    (tmp_path / "labels.json").write_text('{"images": []}')
    torch.save(model, tmp_path / "whole.pt")
    for name, says in (("labels.json", r"labels\.json is not a readable PyTorch file \(neither torch\.save's zip format"),
                       ("whole.pt", r"whole\.pt holds a pickled Python object \(maskrcnn\.modeling\..*save model\.state_dict\(\)")):
        with pytest.raises(CheckpointError, match=says) as raised:
            load_checkpoint(str(tmp_path / name))
        assert "weights_only" not in str(raised.value) and "\n" not in str(raised.value), str(raised.value)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(str(tmp_path / "other.pt"))


def test_other_number_of_classes_says_what_to_do():
    from maskrcnn.checkpoint import load_state

    torch.manual_seed(0)
    five = build_model(get_preset("small", num_classes=5))
    four = build_model(get_preset("small", num_classes=4))
    with pytest.raises(CheckpointError, match=r"is for 5 classes.*has 4.*jobs\.train --weights"):
        load_state(four, five.state_dict(), "five.pt")
    # fine-tuning: everything but the class-specific layers is taken
    load_state(four, five.state_dict(), "five.pt", skip_class_specific=True)
    assert torch.equal(four.backbone.body.conv1.weight, five.backbone.body.conv1.weight)


def test_unknown_preset_and_wrong_arch(tmp_path, small_model):
    model, cfg = small_model
    torch.save(to_torchvision_state_dict(model), tmp_path / "tv.pt")
    with pytest.raises(ValueError, match="unknown model preset 'r18'"):
        load_checkpoint(str(tmp_path / "tv.pt"), arch="r18", categories=CATEGORIES)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_checkpoint(str(tmp_path / "tv.pt"), arch="r50_fpn", categories=CATEGORIES)
    save_checkpoint(str(tmp_path / "ours.pt"), model, cfg, CATEGORIES)
    with pytest.raises(CheckpointError, match="drop --arch"):
        load_checkpoint(str(tmp_path / "ours.pt"), arch="r50_fpn")
