"""Turn a labeling output (jobs.label's Parquet) into COCO JSON.

    python -m jobs.export_coco --input s3://bucket/labels/ --output results.json
    python -m jobs.export_coco --input s3://bucket/labels/ --output review.json --format annotations \\
        --images-root s3://bucket/images/

``--format results`` (the default): a COCO results list ``[{image_id, category_id, segmentation,
bbox, score}]``, what ``COCO.loadRes`` and COCO evaluation servers take. With ``--annotations``
(a COCO file of the same images) the image ids are that file's, matched by file name.

``--format annotations``: a COCO instances file, ``{images, annotations, categories}``, that
labeling tools (CVAT, Label Studio) import for review: images with ``file_name`` relative to
``--images-root``, one annotation per detection with its RLE ``segmentation``, ``bbox``, ``area``,
``iscrowd`` 0 and the model's ``score``; categories are those the rows name.

Keypoint R-CNN labels (``instances.keypoints`` set) become COCO keypoints: ``keypoints`` [x, y, v, ...]
with v 1 in results (as torchvision's COCO evaluation writes its predictions; COCOeval ignores v)
and v 2 (labelled, visible) in an annotations file, with ``num_keypoints``; there a category
with keypoints lists their names and skeleton from ``--categories`` (a COCO JSON, e.g. the
training annotations), else generic names. Without masks (a model with no mask head) there is
no ``segmentation``, and an annotation's ``area`` is its box's.

Without ``--annotations`` images are numbered 1, 2, ... in the output's order (part files by
shard, rows in plan order), the same numbering in both formats. Then ``--format results`` also
writes the numbering beside the results: ``<output stem>.images.json`` (``results.json`` ->
``results.images.json``), a COCO file with the ``images`` (id, file_name, width, height) and
``categories`` and no annotations, so ``COCO("results.images.json").loadRes("results.json")``
maps every detection back to its file. Rows whose image failed (error set) have no size and are
left out, counted on stderr. Each image is listed once: a manifest that names an image twice
gets two rows of it (each line is a request), and the export takes the first row of each image
URI (its detections, or its error) and leaves the others out, counted on stderr. Streams: one
part file at a time, into a temporary file that becomes the output only when the whole JSON is
written (a failed export leaves no file); what it holds is the set of image URIs seen.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import posixpath
import sys
from typing import Iterator

import pyarrow.parquet as pq

from jobs.common import JobError, run_main
from jobs.options import add_storage_options, finite_float, parse_storage_options, resolve_uri_options
from jobs.common import HelpFormatter
from jobs.atomic import AtomicOutput, check_not_an_input
from jobs.labeling.plan import read_plan
from jobs.labeling.shards import part_files
from maskrcnn.storage import explain_storage_error, filesystem, open_uri, same_file, within


def iter_rows(label_output: str, storage_options: dict | None, columns: list[str]) -> Iterator[dict]:
    """The output's rows, part file by part file in shard order, batch by batch."""
    parts, fs = list_parts(label_output, storage_options)
    for part in parts:
        try:
            with fs.open(part, "rb") as f:
                batches = pq.ParquetFile(f).iter_batches(batch_size=1024, columns=columns)
                for batch in batches:
                    yield from batch.to_pylist()
        except (JobError, GeneratorExit):
            raise
        except Exception as exc:  # not Parquet, not jobs.label's columns, storage
            raise JobError(
                f"--input {label_output}: cannot read {part}: {explain_storage_error(exc)}; is it a jobs.label --output?"
            ) from None


def first_rows(rows: Iterator[dict], counts: dict | None = None) -> Iterator[dict]:
    """Each image URI's first row: later rows of a URI seen before (a manifest that lists the
    image twice) are left out, counted in ``counts["repeated"]`` when given."""
    seen: set[str] = set()
    for row in rows:
        uri = row["image_uri"]
        if uri in seen:
            if counts is not None:
                counts["repeated"] += 1
            continue
        seen.add(uri)
        yield row


def list_parts(label_output: str, storage_options: dict | None) -> tuple[list[str], object]:
    """The output's part files in shard order, and their filesystem; JobError when there are none."""
    try:
        fs, root = filesystem(label_output, storage_options)
        root = root.rstrip("/")
        if root.endswith(".parquet") and fs.isfile(root):
            parts = [root]
        else:
            parts = part_files(fs, root)
    except FileNotFoundError:
        raise JobError(f"--input {label_output} does not exist") from None
    except NotADirectoryError:
        parts = []
    except Exception as exc:
        raise JobError(f"cannot read --input {label_output}: {explain_storage_error(exc)}") from None
    if not parts:
        raise JobError(f"--input {label_output} holds no part-*.parquet files: is it a jobs.label --output?")
    return parts, fs


def check_outputs_apart(label_output: str, outputs: list[str], inputs: dict[str, str | None]) -> None:
    """Refuses, before anything is written, an output that is one of the files read (``inputs``:
    option -> URI) or lies inside --input ``label_output``, whose labels it would replace or
    sit among."""
    for output in outputs:
        what = "--output " + output if output == outputs[0] else f"--output {outputs[0]} writes {output} beside it, which"
        if within(output, label_output):
            where = "is" if same_file(output, label_output) else "is inside"
            raise JobError(f"{what} {where} --input {label_output}: it would replace or sit among jobs.label's files; "
                           "give an --output outside the labels")
        check_not_an_input(output, inputs, what, "the export")


def images_sidecar_uri(output: str) -> str:
    """Where ``--format results`` writes its image numbering: ``r.json`` -> ``r.images.json``."""
    return (output[: -len(".json")] if output.lower().endswith(".json") else output) + ".images.json"


def relative_name(image_uri: str, images_root: str | None) -> str:
    """``image_uri`` relative to ``images_root`` (both as written), else the URI unchanged."""
    if images_root:
        root = images_root.rstrip("/") + "/"
        if image_uri.startswith(root):
            return image_uri[len(root):]
    return image_uri


def _default_images_root(label_output: str, storage_options: dict | None) -> str | None:
    """The labeled folder, when the run's input was a folder (not a manifest)."""
    plan = read_plan(label_output, storage_options)
    if plan is None or plan.input.lower().endswith((".txt", ".parquet")):
        return None
    return plan.input


def _ground_truth_ids(uri: str, storage_options: dict | None) -> dict[str, int]:
    try:
        with open_uri(uri, "rb", storage_options) as f:
            data = json.load(f)
        return {_clean(str(img["file_name"])): int(img["id"]) for img in data.get("images", [])}
    except FileNotFoundError:
        raise JobError(f"--annotations {uri} does not exist") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise JobError(f"--annotations {uri} is not a COCO file with images [{{id, file_name}}]: {exc}") from None
    except Exception as exc:
        raise JobError(f"cannot read --annotations {uri}: {explain_storage_error(exc)}") from None


def _clean(file_name: str) -> str:
    return posixpath.normpath(file_name.lstrip("/"))


class _ImageIds:
    def __init__(self, ground_truth: dict[str, int] | None):
        self.ground_truth = ground_truth
        self.next_id = 0
        self.unmatched = 0

    def __call__(self, file_name: str) -> int | None:
        if self.ground_truth is None:
            self.next_id += 1
            return self.next_id
        image_id = self.ground_truth.get(_clean(file_name))
        if image_id is None:
            self.unmatched += 1
        return image_id


def export(
    label_output: str,
    output: str,
    fmt: str = "results",
    images_root: str | None = None,
    annotations: str | None = None,
    min_score: float = 0.0,
    storage_options: dict | None = None,
    categories_uri: str | None = None,
) -> dict:
    """Writes the JSON (and, for results numbered here, its ``.images.json``) whole or not at
    all; returns counts (images, detections, failed, unmatched, repeated: rows of an image
    listed before, left out; outside_root: images not under the ``images_root`` given, named by
    their whole URI)."""
    if fmt not in ("results", "annotations"):
        raise JobError(f"--format must be 'results' or 'annotations', got {fmt!r}")
    if not 0.0 <= min_score <= 1.0:  # scores are probabilities: above 1 every detection would be left out
        raise JobError(f"--min-score must be in [0, 1], got {min_score:g}")
    numbered_here = fmt == "results" and not annotations
    outputs = [output] + ([images_sidecar_uri(output)] if numbered_here else [])
    check_outputs_apart(label_output, outputs, {"--annotations": annotations, "--categories": categories_uri})
    list_parts(label_output, storage_options)  # a bad --input fails before any output exists
    given_root = images_root
    if images_root is None:
        images_root = _default_images_root(label_output, storage_options)
    ground_truth = _ground_truth_ids(annotations, storage_options) if annotations else None
    counts = {"images": 0, "detections": 0, "failed": 0, "unmatched": 0, "repeated": 0, "outside_root": 0}

    def labelled(columns: list[str], counting: bool = True) -> Iterator[tuple[dict, str, int]]:
        """(row, file name, image id) of each image labelled without error and given an id, each
        image once, numbered alike on every pass; the first pass (``counting``) fills ``counts``."""
        ids = _ImageIds(ground_truth)
        for row in first_rows(iter_rows(label_output, storage_options, ["image_uri", "error", *columns]), counts if counting else None):
            if row["error"] is not None:
                counts["failed"] += counting
                continue
            file_name = relative_name(row["image_uri"], images_root)
            if given_root and file_name == row["image_uri"]:  # a --images-root the images are not under
                counts["outside_root"] += counting
            image_id = ids(file_name)
            if image_id is not None:
                yield row, file_name, image_id
        if counting:
            counts["unmatched"] = ids.unmatched
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(AtomicOutput(output, storage_options))
        # beside it, committed just before it (ExitStack unwinds in reverse)
        side = stack.enter_context(AtomicOutput(images_sidecar_uri(output), storage_options)) if numbered_here else None
        if fmt == "results":
            out.write("[")
            first = True
            categories: dict[int, str] = {}
            if side is not None:
                info = {"description": f"the images of the COCO results {output} (jobs.export_coco)", "source": label_output}
                side.write('{"info": ' + json.dumps(info) + ',\n"images": [')
            for row, file_name, image_id in labelled(["instances"] + (["width", "height"] if side is not None else [])):
                if side is not None:
                    image = {"id": image_id, "file_name": file_name, "width": row["width"], "height": row["height"]}
                    side.write(("" if counts["images"] == 0 else ",\n") + json.dumps(image))
                counts["images"] += 1
                for inst in row["instances"]:
                    if inst["score"] < min_score:
                        continue
                    categories.setdefault(inst["category_id"], inst["category"])
                    item = {
                        "image_id": image_id,
                        "category_id": inst["category_id"],
                        "segmentation": inst["mask"],
                        "bbox": [round(v, 2) for v in inst["bbox"]],
                        "score": round(inst["score"], 5),
                    }
                    if inst["mask"] is None:  # a model without a mask head
                        del item["segmentation"]
                    if inst.get("keypoints") is not None:
                        item["keypoints"] = _coco_keypoints(inst["keypoints"], visibility=1)
                    out.write(("" if first else ",\n") + json.dumps(item))
                    first = False
                    counts["detections"] += 1
            out.write("]\n")
            if side is not None:
                cats = [{"id": k, "name": v, "supercategory": ""} for k, v in sorted(categories.items())]
                side.write('],\n"annotations": [],\n"categories": ' + json.dumps(cats) + "}\n")
        elif fmt == "annotations":
            out.write('{"info": {"description": "Mask R-CNN labels (jobs.label)", "source": ' + json.dumps(label_output) + '},\n')
            out.write('"licenses": [],\n"images": [')
            first = True
            for row, file_name, image_id in labelled(["width", "height"]):
                item = {"id": image_id, "file_name": file_name, "width": row["width"], "height": row["height"]}
                out.write(("" if first else ",\n") + json.dumps(item))
                first = False
                counts["images"] += 1
            out.write('],\n"annotations": [')
            categories: dict[int, str] = {}
            keypoint_counts: dict[int, int] = {}
            first = True
            for row, _, image_id in labelled(["instances"], counting=False):  # the same numbering, second pass
                for inst in row["instances"]:
                    if inst["score"] < min_score:
                        continue
                    counts["detections"] += 1
                    categories.setdefault(inst["category_id"], inst["category"])
                    item = {
                        "id": counts["detections"],
                        "image_id": image_id,
                        "category_id": inst["category_id"],
                        "segmentation": inst["mask"],
                        "area": inst["area"],
                        "bbox": [round(v, 2) for v in inst["bbox"]],
                        "iscrowd": 0,
                        "score": round(inst["score"], 5),
                    }
                    if inst["mask"] is None:  # a model without a mask head: no segmentation, the box's area
                        item["segmentation"] = []
                        item["area"] = round(inst["bbox"][2] * inst["bbox"][3], 2)
                    if inst.get("keypoints") is not None:
                        item["keypoints"] = _coco_keypoints(inst["keypoints"], visibility=2)
                        item["num_keypoints"] = len(inst["keypoints"])
                        keypoint_counts[inst["category_id"]] = len(inst["keypoints"])
                    out.write(("" if first else ",\n") + json.dumps(item))
                    first = False
            cats = [{"id": k, "name": v, "supercategory": ""} for k, v in sorted(categories.items())]
            if keypoint_counts:
                _add_keypoint_names(cats, keypoint_counts, categories_uri, storage_options)
            out.write('],\n"categories": ' + json.dumps(cats) + "}\n")
    return counts


def _coco_keypoints(triples: list, visibility: int) -> list[float]:
    """Parquet keypoints [[x, y, score], ...] -> COCO's flat [x1, y1, v1, x2, ...]."""
    flat: list[float] = []
    for x, y, _score in triples:
        flat += [round(x, 2), round(y, 2), visibility]
    return flat


def _add_keypoint_names(cats: list[dict], keypoint_counts: dict[int, int], categories_uri: str | None, storage_options) -> None:
    """COCO keypoint categories name their keypoints and skeleton: from ``categories_uri``'s
    category of the same id when it lists as many keypoints, else "keypoint_1", ..."""
    known: dict[int, dict] = {}
    if categories_uri:
        try:
            with open_uri(categories_uri, "rb", storage_options) as f:
                known = {int(c["id"]): c for c in json.load(f)["categories"]}
        except FileNotFoundError:
            raise JobError(f"--categories {categories_uri} does not exist") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise JobError(f"--categories {categories_uri} has no usable 'categories' list: {exc}") from None
    for cat in cats:
        count = keypoint_counts.get(cat["id"])
        if count is None:
            continue
        source = known.get(cat["id"], {})
        names = source.get("keypoints") or []
        if len(names) == count:
            cat["keypoints"] = list(names)
            cat["skeleton"] = list(source.get("skeleton") or [])
        else:
            cat["keypoints"] = [f"keypoint_{k + 1}" for k in range(count)]
            cat["skeleton"] = []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.export_coco",
        description="Convert jobs.label's Parquet output into a COCO results JSON or a COCO annotation file (for CVAT / Label Studio). "
        "Each image is listed once: where the output has several rows of one image URI (a manifest that lists it twice), "
        "the first row's detections are exported and the others left out.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--input", required=True, metavar="URI", help="a jobs.label --output folder (or one of its part-*.parquet files)")
    parser.add_argument("--output", required=True, metavar="URI", help="the JSON file to write")
    parser.add_argument(
        "--format", default="results", choices=("results", "annotations"),
        help="a COCO results list, or a COCO instances file for labeling tools",
    )
    parser.add_argument(
        "--images-root", default=None, metavar="URI",
        help="file_name = image URI relative to this (default: the labelled folder, from the output's plan; for a manifest, the full URI)",
    )
    parser.add_argument(
        "--annotations", default=None, metavar="URI",
        help="a COCO file of the same images: use its image ids (matched by file_name relative to --images-root)",
    )
    parser.add_argument("--min-score", type=finite_float, default=0.0, metavar="F", help="leave out detections scoring below F")
    parser.add_argument(
        "--categories", default=None, metavar="URI",
        help="a COCO JSON whose categories name the keypoints and skeleton of a Keypoint R-CNN's classes (for --format annotations)",
    )
    add_storage_options(parser)
    args = parser.parse_args(argv)
    resolve_uri_options(parser, args)
    storage_options = parse_storage_options(args.storage_options)
    counts = export(
        args.input, args.output, args.format, args.images_root, args.annotations, args.min_score, storage_options, args.categories
    )
    print(f"wrote {args.output}: {counts['images']} images, {counts['detections']} detections ({args.format})")
    if args.format == "results" and not args.annotations:
        print(f"wrote {images_sidecar_uri(args.output)}: the image ids' file names, width and height "
              "(a COCO file without annotations: COCO(it).loadRes(results) maps the detections to their files)")
    if counts["failed"]:
        print(f"note: {counts['failed']} images that failed to label (error set) are left out", file=sys.stderr)
    if counts["repeated"]:
        print(
            f"note: {counts['repeated']} rows repeat an image URI of an earlier row (listed twice in the manifest) "
            "and are left out: each image is exported once, from its first row",
            file=sys.stderr,
        )
    if counts["unmatched"]:
        print(f"note: {counts['unmatched']} images are not in --annotations {args.annotations} and are left out", file=sys.stderr)
    if counts["outside_root"]:
        print(f"warning: {counts['outside_root']} images are not under --images-root {args.images_root}: their file_name is "
              "their whole URI", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
