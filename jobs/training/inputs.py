"""The driver's checks of ``jobs.train``'s inputs before any worker starts: the datasets, and
the model config and ``--weights`` that fit the annotations. Each problem is a JobError."""

from __future__ import annotations

import argparse
import sys
import warnings

from jobs.common import JobError


def check_dataset(annotations: str, images: str, storage_options: dict | None, what: str):
    """The ``CocoDataset`` of ``annotations`` over the image root ``images``, once it parses,
    lists images and non-crowd annotations, and every image it names exists. ``what`` prefixes
    the options named in errors ("" for --annotations, "val-" for --val-annotations); the
    dataset's warnings are printed once, here."""
    from maskrcnn.data import AnnotationError, CocoDataset, missing_images

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = CocoDataset(annotations, images, storage_options)
    except FileNotFoundError:
        raise JobError(f"--{what}annotations {annotations} does not exist") from None
    except AnnotationError as exc:
        raise JobError(f"--{what}annotations: {exc}") from None
    except Exception as exc:  # permission, network, credentials (botocore's errors are no OSError)
        from maskrcnn.storage import explain_storage_error

        raise JobError(f"cannot read --{what}annotations {annotations}: {explain_storage_error(exc)}") from None
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    if len(dataset) == 0:
        raise JobError(f"--{what}annotations {annotations} lists no images: the dataset is empty")
    instances = sum(1 for a in dataset.coco.dataset["annotations"] if not a.get("iscrowd"))
    if instances == 0:
        raise JobError(f"--{what}annotations {annotations} has no (non-crowd) annotations: nothing to learn or evaluate")
    missing = missing_images(dataset)
    if missing:
        raise JobError(
            f"{len(missing)} of the {len(dataset)} images named in --{what}annotations {annotations} are missing under "
            f"--{what}images {images} (e.g. {', '.join(missing[:3])}); fix the image root or the file_names"
        )
    return dataset


def resolve_model(
    args: argparse.Namespace, categories: list[dict], storage_options: dict | None, keypoints: tuple[list, list] | None = None,
) -> tuple[dict, str | None, bool]:
    """The model config for this run, the kind of --weights, and whether the class-specific
    layers start fresh; loads --weights once into the model to prove they fit.

    ``args``: the command line (its --arch, --weights, --min-size, --max-size); ``categories``:
    the training annotations' (the model's classes, in order); ``storage_options``: for reading
    --weights; ``keypoints``: the annotations' keypoint names and skeleton, which a keypoint head
    is made to predict (None: the annotations have none)."""
    from maskrcnn.checkpoint import CheckpointError, load_state, num_keypoints_of, read_weights
    from maskrcnn.config import get_preset
    from maskrcnn.modeling import build_model

    num_classes = len(categories) + 1
    kind, reinit, state = None, False, None
    try:
        if args.weights is None:
            config = get_preset(args.arch or "r50_fpn", num_classes=num_classes)
        else:
            weights = read_weights(args.weights, arch=args.arch, default_arch="r50_fpn", storage_options=storage_options)
            kind, state = weights.kind, weights.state
            if kind == "torchvision":
                # torchvision's class index is a category id; ours is the annotations' order
                reinit = True
                if weights.config.num_classes == num_classes:
                    print("warning: --weights has as many classes as the annotations, but a torchvision state dict's classes are its "
                          "own category ids: its class-specific layers are re-initialised", file=sys.stderr)
            else:
                reinit = [(c["id"], c["name"]) for c in weights.categories] != [(c["id"], c["name"]) for c in categories]
            config = weights.config.replace(num_classes=num_classes)
    except CheckpointError as exc:
        raise JobError(f"--weights: {exc}") from None
    except ValueError as exc:  # an unknown --arch preset, a damaged config
        raise JobError(str(exc)) from None
    config = _fit_keypoints(config, keypoints, args.arch)
    if state is not None and config.keypoint_head.enabled and num_keypoints_of(state) not in (None, config.keypoint_head.num_keypoints):
        reinit = True  # other keypoints than the weights': the keypoint predictor starts fresh
    config = config.with_overrides(min_size=args.min_size, max_size=args.max_size)  # an explicit --min-size is the one training size too
    if state is not None:
        try:
            load_state(build_model(config), state, args.weights, skip_class_specific=reinit)
        except CheckpointError as exc:
            raise JobError(f"--weights: {exc}") from None
    return config.to_dict(), kind, reinit


def _fit_keypoints(config, keypoints: tuple[list, list] | None, arch: str | None):
    """``config`` (a ModelConfig) with a keypoint head made to predict ``keypoints`` (the
    annotations' names and skeleton; None: they have none). Annotations without keypoints stop
    a keypoint model's run (``arch``: the --arch to name); keypoints a model without the head
    cannot learn are noted."""
    from maskrcnn.checkpoint import fit_keypoint_head

    names, skeleton = keypoints or ([], [])
    if not config.keypoint_head.enabled:
        if names:
            print(f"note: --annotations have {len(names)} keypoints per instance; this model has no keypoint head and does not learn them "
                  "(--arch keypoint_r50_fpn or small_keypoint does)", file=sys.stderr)
        return config
    if not names:
        raise JobError(
            f"the model{f' --arch {arch}' if arch else ''} has a keypoint head but --annotations has no keypoints: a Keypoint R-CNN "
            "trains on COCO keypoint annotations (a category's 'keypoints' names and 'skeleton', each annotation's 'keypoints')"
        )
    return fit_keypoint_head(config, len(names), names, skeleton)
