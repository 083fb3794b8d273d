"""Single-file checkpoints, and torchvision's Mask R-CNN (and Keypoint R-CNN) state dicts.

A project checkpoint is one ``torch.save`` file, readable with ``torch.load(weights_only=True)``:

    {"format": "maskrcnn-ray/1", "model": state dict, "config": ModelConfig.to_dict(),
     "categories": [{"id": int, "name": str}, ...]}   # class index k <-> categories[k - 1]

A bare torchvision state dict (the COCO checkpoints' layout, old or new key names) is accepted
too; its architecture and categories come from the caller, and as in torchvision its class
index is the category id. Without categories, one of torchvision's COCO shapes takes the ones
shipped in ``maskrcnn/data/``: 91 classes (a Mask R-CNN) COCO's 80 categories at their ids
(``coco_categories.json``), 2 classes with a keypoint head COCO's person
(``person_keypoints.json``). torchvision's ``keypointrcnn_resnet50_fpn`` state dicts (keys
``roi_heads.keypoint_head.*``, ``roi_heads.keypoint_predictor.*``, the same in our layout) load
with ``arch="keypoint_r50_fpn"``; the number of keypoints is read from the state dict.
torchvision's ``maskrcnn_resnet50_fpn_v2`` state dicts (BatchNorm in the trunk, FPN and heads, a
``box_head.0.0.*``..``box_head.5.*`` conv-fc box head) load with ``arch="r50_fpn_v2"``.

A folder given as a checkpoint stands for the file in it: a jobs.train ``--output``'s
``model.pt``, else a Ray Train checkpoint folder's ``checkpoint.pt``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import pickle
import re
from dataclasses import dataclass

import torch

from maskrcnn.config import ModelConfig, get_preset
from maskrcnn.modeling import MaskRCNN, build_model
from maskrcnn.storage import explain_storage_error, filesystem, open_uri, put_atomic

FORMAT = "maskrcnn-ray/1"
# Layers whose shape depends on the number of classes: re-initialised when fine-tuning.
CLASS_SPECIFIC = ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred.", "roi_heads.mask_predictor.mask_fcn_logits.")
# The keypoint predictor's shape depends on the number of keypoints (not on the classes): when
# fine-tuning onto other keypoints it is re-initialised too.
KEYPOINT_SPECIFIC = ("roi_heads.keypoint_predictor.",)
KEYPOINT_PREDICTOR_WEIGHT = "roi_heads.keypoint_predictor.kps_score_lowres.weight"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with what to do about it."""


@dataclass
class LoadedCheckpoint:
    model: MaskRCNN
    config: ModelConfig
    # class index -> {"id": category id, "name": ...}; background (0) and unused indices absent
    label_map: dict[int, dict]
    model_hash: str
    uri: str
    # set when the categories are the shipped default, e.g.
    # "categories: COCO's 80 (maskrcnn/data/coco_categories.json)"; the jobs print it
    categories_note: str | None = None


def convert_torchvision_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's legacy key names (its COCO checkpoints) -> the current layout, which is ours.

    ``rpn.head.conv.weight`` -> ``rpn.head.conv.0.0.weight``, ``mask_head.mask_fcnN.*`` ->
    ``mask_head.{N-1}.0.*``, ``fpn.inner_blocks.i.weight`` -> ``fpn.inner_blocks.i.0.weight``
    (and layer_blocks); BatchNorm's ``num_batches_tracked`` counters are dropped (a frozen norm
    has none; ``load_state`` gives a trained BatchNorm, as r50_fpn_v2's, its own).
    """
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = re.sub(r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1", key)
        key = re.sub(
            r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$", lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}", key
        )
        key = re.sub(r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)$", r"backbone.fpn.\1.\2.0.\3", key)
        out[key] = value
    return out


def to_torchvision_state_dict(model: MaskRCNN) -> dict[str, torch.Tensor]:
    """Our weights in torchvision's current layout: loads into ``maskrcnn_resnet50_fpn`` (or, from
    r50_fpn_v2, strictly into ``maskrcnn_resnet50_fpn_v2``) as is."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# The file a folder given as a checkpoint stands for: a jobs.train --output's model.pt, else a Ray
# Train checkpoint folder's checkpoint.pt (which loads as a model too).
FOLDER_CHECKPOINTS = ("model.pt", "checkpoint.pt")


def _read_bytes(uri: str, storage_options: dict | None) -> bytes:
    try:
        with open_uri(uri, "rb", storage_options=storage_options) as f:
            data = f.read()
        missing = False
    except (FileNotFoundError, IsADirectoryError):
        data, missing = b"", True
    except Exception as exc:  # permission, network, credentials
        raise CheckpointError(f"checkpoint {uri} cannot be read: {explain_storage_error(exc)}") from None
    if data:
        return data
    # nothing read: a folder (s3fs opens a prefix as an empty file), or no such file
    folder, inside = _checkpoint_in_folder(uri, storage_options)
    if inside is not None:
        return _read_bytes(inside, storage_options)
    if folder:
        raise CheckpointError(
            f"checkpoint {uri} is a folder without {' or '.join(FOLDER_CHECKPOINTS)}: give the checkpoint file "
            "(a jobs.train --output holds model.pt once its training has ended)"
        )
    if missing:
        raise CheckpointError(f"checkpoint {uri} does not exist")
    return data  # an empty file: read_checkpoint says so


def _checkpoint_in_folder(uri: str, storage_options: dict | None) -> tuple[bool, str | None]:
    """Whether ``uri`` is a folder (an object store's prefix), and its model.pt or checkpoint.pt
    when it holds one."""
    from maskrcnn.storage import join_uri

    try:
        fs, path = filesystem(uri, storage_options)
        if not fs.isdir(path):
            return False, None
        for name in FOLDER_CHECKPOINTS:
            if fs.isfile(f"{path.rstrip('/')}/{name}"):
                return True, join_uri(uri, name)
    except Exception:  # the read's own error is the one to say
        return False, None
    return True, None


def _unreadable(uri: str, exc: Exception, empty: bool) -> str:
    """One line for a file ``torch.load(weights_only=True)`` refused. torch's own message advises
    ``weights_only=False``, which would let the file run code: a pickled object (``torch.save(model)``)
    is named as such, anything else is not a PyTorch file."""
    found = re.search(r"Unsupported (?:global: GLOBAL |class )(\S+)", str(exc))
    if found:
        return (f"checkpoint {uri} holds a pickled Python object ({found.group(1)}), not only tensors, and is not "
                "unpickled, since that could run code from the file: save model.state_dict() instead of the model, "
                "or point to a model.pt written by jobs.train")
    if empty:
        reason = "the file is empty"
    elif isinstance(exc, pickle.UnpicklingError):
        reason = "neither torch.save's zip format nor its legacy one"
    else:
        reason = str(exc).split(". ")[0].split("\n")[0][:120]
    return (f"checkpoint {uri} is not a readable PyTorch file ({reason}); is it truncated or corrupt? "
            "Re-copy it, or point to a model.pt written by jobs.train or a torchvision state dict")


def read_checkpoint(uri: str, storage_options: dict | None = None) -> tuple[dict, str]:
    """The raw checkpoint object and its content hash (``sha256:`` + 16 hex digits)."""
    data = _read_bytes(uri, storage_options)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()[:16]
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(_unreadable(uri, exc, not data)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {uri} holds a {type(obj).__name__}, not a checkpoint dict or a state dict")
    return obj, digest


def is_torchvision_state_dict(obj: dict) -> bool:
    return "format" not in obj and any(str(k).startswith("backbone.body.") for k in obj)


def num_classes_of(state: dict[str, torch.Tensor]) -> int:
    weight = state.get("roi_heads.box_predictor.cls_score.weight")
    if weight is None:
        raise CheckpointError("state dict has no roi_heads.box_predictor.cls_score.weight: not a Mask R-CNN")
    return int(weight.shape[0])


def num_keypoints_of(state: dict[str, torch.Tensor]) -> int | None:
    """The keypoints a Keypoint R-CNN state dict predicts (None: it has no keypoint head)."""
    weight = state.get(KEYPOINT_PREDICTOR_WEIGHT)
    return None if weight is None else int(weight.shape[1])  # ConvTranspose2d: (in, out, kh, kw)


def fit_keypoint_head(config: ModelConfig, num_keypoints: int | None, names=(), skeleton=()) -> ModelConfig:
    """``config`` with its keypoint head predicting ``num_keypoints``: with ``names`` (one per
    keypoint), those names and ``skeleton``; else the head's own names and skeleton when the
    number is unchanged, none when it changes. Unchanged without a keypoint head."""
    from dataclasses import replace

    head = config.keypoint_head
    if not head.enabled or num_keypoints is None:
        return config
    if names and len(names) == num_keypoints:
        names, skeleton = tuple(names), tuple(skeleton)
    elif num_keypoints == head.num_keypoints:
        return config
    else:
        names, skeleton = (), ()
    return config.replace(keypoint_head=replace(head, num_keypoints=num_keypoints, keypoint_names=names, skeleton=skeleton))


def categories_from_coco(uri: str, storage_options: dict | None = None) -> list[dict]:
    """The ``categories`` of a COCO JSON file: [{"id", "name"}], sorted by id."""
    import json

    try:
        with open_uri(uri, "rb", storage_options=storage_options) as f:
            data = json.load(f)
        cats = [{"id": int(c["id"]), "name": str(c["name"])} for c in data["categories"]]
    except FileNotFoundError:
        raise CheckpointError(f"categories file {uri} does not exist") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"categories file {uri} has no usable 'categories' list of {{id, name}}: {exc}") from None
    except Exception as exc:  # permission, network, credentials
        raise CheckpointError(f"categories file {uri} cannot be read: {explain_storage_error(exc)}") from None
    return sorted(cats, key=lambda c: c["id"])


# (num_classes, has a keypoint head) of torchvision's COCO checkpoints -> their categories,
# shipped in maskrcnn/data/, and how to name them
DEFAULT_CATEGORIES = {
    (91, False): ("coco_categories.json", "COCO's 80"),
    (2, True): ("person_keypoints.json", "COCO's person"),
}


def default_categories(num_classes: int, keypoints: bool) -> tuple[list[dict], str] | None:
    """The shipped categories of torchvision's COCO checkpoints for a state dict of this shape,
    and a one-line note that says so; None for any other shape."""
    from importlib import resources

    entry = DEFAULT_CATEGORIES.get((num_classes, keypoints))
    if entry is None:
        return None
    name, what = entry
    path = resources.files("maskrcnn.data") / name
    return categories_from_coco(str(path)), f"categories: {what} (maskrcnn/data/{name})"


@dataclass
class Weights:
    """What a checkpoint holds, before any model is built from it."""

    kind: str  # "project" (a jobs.train checkpoint) or "torchvision" (a bare state dict)
    config: ModelConfig  # a bare state dict's: the named architecture at its classes and keypoints
    state: dict[str, torch.Tensor]  # in our (torchvision's current) key layout
    categories: list[dict] | None  # a project checkpoint's, class index k <-> categories[k - 1]; None for a bare state dict
    model_hash: str


def read_weights(uri: str, *, arch: str | None = None, default_arch: str | None = None, storage_options: dict | None = None) -> Weights:
    """The checkpoint at ``uri``, told apart: a project checkpoint (``arch``, when given, must
    name its backbone) or a bare torchvision state dict of architecture ``arch`` (or
    ``default_arch``; with neither, an error says to name it)."""
    obj, digest = read_checkpoint(uri, storage_options)
    if is_torchvision_state_dict(obj):
        arch = arch or default_arch
        if arch is None:
            raise CheckpointError(
                f"checkpoint {uri} is a bare torchvision state dict: name its architecture with --arch "
                "(e.g. r50_fpn) and, unless it is one of torchvision's COCO checkpoints, its classes with --categories (a COCO JSON)"
            )
        state = convert_torchvision_state_dict(obj)
        config = fit_keypoint_head(get_preset(arch, num_classes=num_classes_of(state)), num_keypoints_of(state))
        return Weights("torchvision", config, state, None, digest)
    if obj.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {uri} is neither a jobs.train checkpoint ({FORMAT}) nor a torchvision Mask R-CNN state dict "
            f"(top-level keys: {sorted(map(str, obj))[:5]})"
        )
    try:
        config = ModelConfig.from_dict(obj["config"])
        state = obj["model"]
        categories = [{"id": int(c["id"]), "name": str(c["name"])} for c in obj["categories"]]
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {uri} is damaged: {exc}") from None
    if arch is not None and arch != "auto":
        preset = get_preset(arch)
        if (preset.backbone.name, preset.backbone.kind) != (config.backbone.name, config.backbone.kind):
            raise CheckpointError(
                f"checkpoint {uri} holds a {config.backbone.name} ({config.backbone.kind}) model, but --arch {arch} asks for "
                f"{preset.backbone.name} ({preset.backbone.kind}); drop --arch (the checkpoint carries its own config)"
            )
    if len(categories) != config.num_classes - 1:
        raise CheckpointError(f"checkpoint {uri} has {len(categories)} categories for {config.num_classes - 1} classes")
    return Weights("project", config, state, categories, digest)


def load_checkpoint(
    uri: str,
    *,
    arch: str | None = None,
    categories: list[dict] | None = None,
    storage_options: dict | None = None,
    overrides: dict | None = None,
    device: str | None = None,
) -> LoadedCheckpoint:
    """A ready model (eval mode, CPU) from a project checkpoint or a bare torchvision state dict.

    ``device="meta"``: the model is built without memory and the weights are only checked
    against it (names and shapes), not copied: the config, categories and hash of a checkpoint,
    with every error a real load would raise, at a fraction of the cost.

    ``overrides``: keyword arguments of ``ModelConfig.with_overrides`` (``min_size``,
    ``max_size``, ``score_thresh``, ``detections_per_img``; None keeps the checkpoint's).
    """
    weights = read_weights(uri, arch=arch, storage_options=storage_options)
    config, state = weights.config, weights.state
    outside: list[int] = []  # category ids a bare state dict has no class for
    note = None
    if weights.kind == "torchvision":
        if categories is None:
            default = default_categories(config.num_classes, num_keypoints_of(state) is not None)
            if default is None:
                raise CheckpointError(
                    f"checkpoint {uri} is a bare torchvision state dict of {config.num_classes} classes (not COCO's 91): "
                    "name its classes with --categories (a COCO JSON)"
                )
            categories, note = default
        # torchvision's convention: the class index is the category id. An id the model has no
        # class for would silently never be labelled: refuse it. Classes the categories leave
        # unnamed are labelled "class K" (id K).
        if note is None:  # refused after the weights load: a wrong --arch is the first thing to say
            outside = [c["id"] for c in categories if not 0 <= c["id"] < config.num_classes]
        label_map = {c["id"]: c for c in categories if 0 < c["id"] < config.num_classes}
    else:
        label_map = {k + 1: c for k, c in enumerate(weights.categories)}
    if overrides:
        config = config.with_overrides(**overrides)
    with torch.device(device) if device else contextlib.nullcontext():
        model = build_model(config)
    load_state(model, state, uri)
    if outside:
        raise CheckpointError(
            f"--categories names category ids {outside[:10]} that checkpoint {uri} has no class for: a bare torchvision state "
            f"dict's class index is the category id, and it has {config.num_classes} classes (ids 1-{config.num_classes - 1}, "
            "0 is the background); give the categories this model was trained with"
        )
    model.eval()
    return LoadedCheckpoint(model=model, config=config, label_map=label_map, model_hash=weights.model_hash, uri=uri, categories_note=note)


def load_state(model: MaskRCNN, state: dict[str, torch.Tensor], uri: str = "state dict", skip_class_specific: bool = False) -> None:
    """Strict load, with an error that says which layers disagree and what to do. BatchNorm's
    ``num_batches_tracked`` counters are optional either way: a state dict without them (a
    converted torchvision one) keeps the model's, one with them loads into frozen norms too."""
    own = model.state_dict()
    counter = "num_batches_tracked"
    state = {k: v for k, v in state.items() if not (k.endswith(counter) and k not in own)}
    state.update({k: v for k, v in own.items() if k.endswith(counter) and k not in state})
    fresh: list[str] = []
    if skip_class_specific:
        state = {k: v for k, v in state.items() if not k.startswith(CLASS_SPECIFIC)}
        # other keypoints than the checkpoint's: the keypoint predictor starts fresh as well
        fresh = [k for k, v in state.items() if k.startswith(KEYPOINT_SPECIFIC) and k in own and own[k].shape != v.shape]
        state = {k: v for k, v in state.items() if k not in fresh}
    missing = [k for k in own if k not in state and k not in fresh and not (skip_class_specific and k.startswith(CLASS_SPECIFIC))]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if mismatched and all(k.startswith(CLASS_SPECIFIC) for k in mismatched):
        raise CheckpointError(
            f"checkpoint {uri} is for {num_classes_of(state)} classes (background included) but the model has "
            f"{own['roi_heads.box_predictor.cls_score.weight'].shape[0]}; to train on other classes, start from it with "
            "jobs.train --weights (its class-specific layers are then re-initialised)"
        )
    if any(k.startswith("roi_heads.keypoint_") for k in unexpected) and not any(k.startswith("roi_heads.keypoint_") for k in own):
        raise CheckpointError(
            f"checkpoint {uri} is a Keypoint R-CNN (it has a keypoint head) but the model has none; "
            "use a keypoint architecture (--arch keypoint_r50_fpn, or small_keypoint)"
        )
    if any(k.startswith("roi_heads.box_head.0.0.") for k in unexpected) and "roi_heads.box_head.fc6.weight" in own:
        raise CheckpointError(
            f"checkpoint {uri} has a conv-fc box head (torchvision's maskrcnn_resnet50_fpn_v2) but the model has the 2-fc one "
            f"({len(missing)} missing, {len(unexpected)} unexpected); use --arch r50_fpn_v2"
        )
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"checkpoint {uri} does not fit the model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(mismatched)} of another shape (e.g. {mismatched[:3]}); "
            "is --arch the architecture it was trained with?"
        )
    if next(model.parameters()).device.type != "meta":  # a meta model: checked, nothing to copy
        model.load_state_dict(state, strict=not skip_class_specific)


def save_checkpoint(uri: str, model: MaskRCNN, config: ModelConfig, categories: list[dict], storage_options: dict | None = None,
                    training_state: dict | None = None) -> None:
    """Writes the single-file checkpoint; ``categories[k-1]`` names class index k.
    ``training_state``: more entries (jobs.train's optimizer, scheduler and step), kept beside
    the model; the file still loads with ``load_checkpoint``."""
    if len(categories) != config.num_classes - 1:
        raise ValueError(f"{len(categories)} categories for a model with {config.num_classes - 1} classes")
    payload = {
        "format": FORMAT,
        # NCHW whatever layout the model ran in (training's is NHWC): the same file either way
        "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "config": config.to_dict(),
        "categories": [{"id": int(c["id"]), "name": str(c["name"])} for c in categories],
        **(training_state or {}),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    fs, path = filesystem(uri, storage_options)
    put_atomic(fs, path, buffer.getvalue())  # a reader (jobs.label on a run's model.pt) never sees it half-written
