"""The command-line options the jobs share: storage, model size, precision, test-time augmentation."""

from __future__ import annotations

import argparse
import json
import math

from jobs.common import JobError


def finite_float(text: str) -> float:
    """argparse's ``type`` for a number option: a finite float (``float`` takes "nan" and "inf",
    which pass every range check made with comparisons)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def wait_seconds(text: str) -> float:
    """argparse's ``type`` for a waiting time: a number of seconds, ``inf`` to wait for ever
    (``nan`` would pass the range check and end each wait at once)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"not a number of seconds (inf: for ever): {text!r}")
    return value


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-options",
        default=None,
        metavar="JSON",
        help="fsspec storage options as JSON, e.g. '{\"client_kwargs\": {\"endpoint_url\": \"http://...\"}}' "
        "(default: none; S3 credentials and endpoint come from the standard AWS_* variables)",
    )


def resolve_uri_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Each URI option of ``parser`` (metavar ``URI``) that ``args`` sets: a JobError naming it
    when this machine cannot open its storage (an unknown protocol, or one whose package is not
    installed, as gcsfs for gs://); a local path made absolute, for Ray's workers, which may run
    in another directory."""
    from maskrcnn.storage import absolute_uri, check_protocol

    for action in parser._actions:
        uri = getattr(args, action.dest, None) if action.metavar == "URI" else None
        if not uri:
            continue
        try:
            check_protocol(uri)
        except ValueError as exc:
            raise JobError(f"{action.option_strings[0]} {exc}") from None
        setattr(args, action.dest, absolute_uri(uri))


def add_size_options(group, default: str = "the checkpoint's or the preset's") -> None:
    """--min-size and --max-size, the model's resize, for every job that runs a model."""
    group.add_argument(
        "--min-size", type=int, default=None, metavar="N",
        help=f"resize the shorter image side to N pixels (default: {default}; 800 for r50_fpn)",
    )
    group.add_argument(
        "--max-size", type=int, default=None, metavar="N",
        help=f"... unless the longer side would pass N (default: {default}; 1333 for r50_fpn)",
    )


def add_precision_options(group, reference_path: str | None = None) -> None:
    """--precision, and --reference-path (help ``reference_path``) for the jobs that run the
    fast path."""
    group.add_argument(
        "--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
        help="autocast precision of the model; auto: bf16 on GPUs (fp16 where bf16 is unsupported), fp32 on CPUs",
    )
    if reference_path is not None:
        group.add_argument(
            "--reference-path", action="store_true",
            help="run the model exactly as built (no norm folding, no channels_last) instead of the fast path" + reference_path,
        )


def warn_slow_cpu_precision(precision: str, on_cpu: bool) -> None:
    """One line when ``--precision bf16`` runs the model on a CPU without bf16 kernels (this
    machine's, where the job runs it): it works there, slower than fp32."""
    from maskrcnn.engine import cpu_runs_bf16

    if on_cpu and precision == "bf16" and not cpu_runs_bf16():
        print(
            "note: --precision bf16 on a CPU without bf16 kernels (AVX512 or AMX), as this machine's, runs slower than fp32 "
            "(3.3x slower on an AVX2 CPU); leave --precision at auto for fp32 on CPUs",
            flush=True,
        )


def add_tta_option(group, what: str = "the views' detections are merged") -> None:
    """--tta SPEC (``maskrcnn.tta``'s spec), for the jobs that run inference; ``what``: how the
    job uses the merged detections, for the help."""
    group.add_argument(
        "--tta", default=None, metavar="SPEC",
        help="test-time augmentation (the paper's data distillation): 'flip' runs each image and its mirror image, 'flip,640,800' "
        "also at those short sides (640,800 alone: scales without the mirror); " + what + " (class-wise NMS, masks averaged; "
        "add 'vote' for box voting: boxes averaged over the views, scores the views' mean); costs a forward per view, one image "
        "at a time (default: off)",
    )


def check_tta(spec: str | None, model=None) -> str:
    """--tta in canonical form ("" when off); a JobError naming it when the spec is wrong, or when
    ``model`` (given once loaded) cannot run it."""
    if spec is None:  # off: no need to import the model's code (torch) to say so
        return ""
    from maskrcnn.tta import check_model, parse_tta

    try:
        tta = parse_tta(spec)
    except ValueError as exc:  # it names the spec
        raise JobError(f"--tta {exc}") from None
    if tta is not None and model is not None:
        try:
            check_model(model)
        except ValueError as exc:
            raise JobError(f"--tta {spec}: {exc}") from None
    return str(tta or "")


def parse_storage_options(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobError(f"--storage-options is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise JobError(f"--storage-options must be a JSON object, got {type(value).__name__}")
    for key in ("client_kwargs", "config_kwargs", "s3_additional_kwargs"):  # s3fs's, handed on as keyword arguments
        if key in value and not isinstance(value[key], dict):
            raise JobError(f"--storage-options' {key} must be a JSON object, got {json.dumps(value[key])[:80]}")
    return value
