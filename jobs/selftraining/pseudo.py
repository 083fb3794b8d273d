"""From a teacher's labels to a student's training set.

``select``: jobs.export_coco's annotations file of the labels (every detection at or above the
lowest threshold) -> ``pseudo.json``, the detections at or above their category's threshold as a
COCO instances file over the unlabeled images (``file_name`` relative to the labelled folder, the
full URI for a manifest), each image once; images left without one kept as negatives or dropped.

``merge``: the labelled set and ``pseudo.json`` -> ``train.json``, one COCO file whose
``file_name``s are relative to the deepest folder that holds both sets of images (jobs.train
joins its ``--images`` and each ``file_name``); ``info.images_root`` names that folder.
"""

from __future__ import annotations

import json
import posixpath

from jobs.atomic import AtomicOutput
from jobs.common import JobError
from maskrcnn.storage import join_uri, open_uri


def read_json(uri: str, storage_options: dict | None) -> dict:
    with open_uri(uri, "rb", storage_options) as f:
        return json.load(f)


def write_json(uri: str, data: dict, storage_options: dict | None) -> None:
    """``data`` at ``uri``, whole or not at all: one image or annotation a line, readable."""
    with AtomicOutput(uri, storage_options) as out:
        head = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
        out.write("{" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()) + ",\n")
        for key in ("images", "annotations"):
            out.write(f'"{key}": [\n' + ",\n".join(json.dumps(item) for item in data[key]) + "\n],\n")
        out.write('"categories": ' + json.dumps(data["categories"]) + "}\n")


def write_json_plain(uri: str, data: dict, storage_options: dict | None) -> None:
    """Any JSON ``data`` at ``uri`` (indented), whole or not at all."""
    with AtomicOutput(uri, storage_options) as out:
        json.dump(data, out, indent=2)
        out.write("\n")


def full_uri(root: str, file_name: str) -> str:
    """An image's URI from its image root and ``file_name`` (as jobs.train and CocoDataset join them)."""
    return join_uri(root, posixpath.normpath(file_name.lstrip("/"))) if root else file_name


def select(detections: dict, categories: list[dict], thresholds: dict[int, float], negatives: str, labelled_uris: set[str],
           images_root: str) -> tuple[dict, dict]:
    """The pseudo-labels of ``detections`` (export_coco's annotations file, ``file_name``s
    relative to ``images_root``, "" for full URIs) and their counts. ``categories``: the
    teacher's (the labelled set's); ``thresholds``: category id -> the lowest score kept;
    ``negatives``: "keep" or "drop" the images left with none; ``labelled_uris``: the labelled
    images, never pseudo-labelled."""
    kept_annotations: dict[int, list[dict]] = {}
    for ann in detections["annotations"]:
        threshold = thresholds.get(int(ann["category_id"]))
        if threshold is not None and ann.get("score", 1.0) >= threshold:
            kept_annotations.setdefault(int(ann["image_id"]), []).append(ann)
    images, annotations = [], []
    counts = {"unlabeled_images": len(detections["images"]), "pseudo_images": 0, "pseudo_annotations": 0, "negatives": 0,
              "dropped_images": 0, "labelled_left_out": 0}
    per_category = {int(c["id"]): 0 for c in categories}
    for image in detections["images"]:
        if full_uri(images_root, image["file_name"]) in labelled_uris:
            counts["labelled_left_out"] += 1
            continue
        found = kept_annotations.get(int(image["id"]), [])
        if not found and negatives == "drop":
            counts["dropped_images"] += 1
            continue
        images.append(image)
        counts["pseudo_images"] += 1
        counts["negatives"] += not found
        for ann in found:
            annotations.append({**ann, "id": len(annotations) + 1})
            per_category[int(ann["category_id"])] = per_category.get(int(ann["category_id"]), 0) + 1
    counts["pseudo_annotations"] = len(annotations)
    names = {int(c["id"]): c["name"] for c in categories}
    counts["per_category"] = {names.get(k, str(k)): v for k, v in sorted(per_category.items())}
    info = {**detections.get("info", {}), "description": "pseudo-labels (jobs.selftrain)", "images_root": images_root,
            "score_threshold": {str(k): v for k, v in sorted(thresholds.items())}, "negatives": negatives}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}, counts


def common_root(uris: list[str]) -> str:
    """The deepest folder holding every one of ``uris`` (absolute local paths or URIs of one
    protocol); JobError when that is a filesystem's root, whose listing jobs.train would walk."""
    protocols = {u.split("://", 1)[0] if "://" in u else "" for u in uris}
    if len(protocols) > 1:
        raise JobError(
            f"the labelled and unlabeled images are on different filesystems ({', '.join(sorted(p or 'local' for p in protocols))}); "
            "a student trains on one image root: copy them to one place"
        )
    protocol = protocols.pop()
    paths = [u.split("://", 1)[1] if protocol else u for u in uris]
    try:
        root = posixpath.commonpath([posixpath.dirname(p) for p in paths])
    except ValueError:  # absolute and relative paths: a manifest's lines are relative
        raise JobError("--unlabeled lists relative paths; give its images as absolute paths or URIs") from None
    if root in ("", "/"):
        raise JobError(
            "the labelled and unlabeled images share no folder below the filesystem's root (or bucket list); "
            "a student trains on one image root: put them under one folder or bucket"
        )
    return f"{protocol}://{root}" if protocol else root


def merge(labelled: dict, labelled_root: str, pseudo: dict, repeat: int) -> dict:
    """One COCO file of the labelled images (each listed ``repeat`` times) and the pseudo-labelled
    ones, its ``file_name``s relative to ``info.images_root``; the labelled set's categories."""
    pseudo_root = pseudo["info"].get("images_root", "")
    sources = [(labelled, labelled_root, repeat), (pseudo, pseudo_root, 1)]
    uris = [full_uri(root, img["file_name"]) for data, root, _ in sources for img in data["images"]]
    root = common_root(uris)
    images, annotations = [], []
    for data, data_root, times in sources:
        by_image: dict[int, list[dict]] = {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        for _ in range(times):
            for image in data["images"]:
                uri = full_uri(data_root, image["file_name"])
                new_id = len(images) + 1
                images.append({**image, "id": new_id, "file_name": uri[len(root):].lstrip("/")})
                for ann in by_image.get(image["id"], []):
                    annotations.append({**ann, "id": len(annotations) + 1, "image_id": new_id})
    info = {"description": "labelled + pseudo-labelled images (jobs.selftrain)", "images_root": root,
            "labelled_images": len(labelled["images"]) * repeat, "pseudo_images": len(pseudo["images"])}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": labelled["categories"]}
