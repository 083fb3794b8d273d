"""jobs.train and jobs.evaluate meet some mistakes in their inputs only once they read them: an
image whose size is not the one its COCO file gives (found when it is decoded, in a DataLoader
process or in an evaluation). A restart from the last checkpoint (--max-failures) would meet it
again, so the job ends at the first with one line naming it, exit 2, no traceback, and no
second attempt. ``python -m jobs.X`` subprocesses, each with its own local Ray, as users run them."""

from __future__ import annotations

import json

import pytest

from maskrcnn.data.synthetic import make_sample_dataset
from tests.job_process import Job
from tests.test_job_train import SMALL, start_steps


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return make_sample_dataset(str(tmp_path_factory.mktemp("sample")), {"train": 8, "val": 4}, seed=5)


def _with_a_wider_image(annotations: str, images: str, out) -> tuple[str, str]:
    """A copy of the ``images`` folder (at ``out``) whose last image is 7 px wider than
    ``annotations`` say (as after re-exporting it), and that image's file name."""
    import shutil

    from PIL import Image

    shutil.copytree(images, out)
    name = json.loads(open(annotations).read())["images"][-1]["file_name"]
    with Image.open(out / name) as image:
        wider = Image.new(image.mode, (image.width + 7, image.height))
        wider.paste(image)
    wider.save(out / name)
    return str(out), name


def test_mistakes_are_told_from_other_errors_however_they_arrive():
    """jobs.mistakes.mistake_in: the mistake's own line, raised in the worker, re-raised by
    a DataLoader process (torch's ExceptionWrapper) or by a Ray task (--ingest ray-data); None
    for errors a restart may fix."""
    import ray.exceptions
    from torch._utils import ExceptionWrapper

    from jobs.mistakes import mistake_in
    from maskrcnn.data import AnnotationError, ImageDecodeError

    line = "a.json: image id 8 (8.png) decodes to 223x273 (after EXIF orientation) but the file says 216x273; fix its width/height"

    def raised(fn):
        try:
            fn()
        except Exception as exc:
            return exc

    def annotation_error():
        raise AnnotationError(line)

    def reraised_by_torch():
        try:
            annotation_error()
        except AnnotationError:
            wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
        wrapper.reraise()

    from_torch = raised(reraised_by_torch)
    assert "Traceback" in str(from_torch)
    from_ray = ray.exceptions.RayTaskError("Map(BatchLoader)", "Traceback (most recent call last): ...",
                                           raised(annotation_error)).as_instanceof_cause()
    chained = raised(lambda: _chain(from_ray))  # as Ray Data raises it: from the task's error
    for exc in (raised(annotation_error), from_torch, from_ray, chained):
        assert mistake_in(exc) == line, (type(exc), str(exc)[:300])
    assert mistake_in(ImageDecodeError("b.jpg: truncated or corrupt image")) == "b.jpg: truncated or corrupt image"
    assert mistake_in(FloatingPointError("the loss is nan at step 9 (rank 0); lower --lr")).startswith("the loss is nan")
    assert mistake_in(RuntimeError("connection reset")) is None
    assert mistake_in(ConnectionError("S3")) is None


def test_a_storage_that_refuses_the_bytes_for_good_is_told_from_passing_errors(tmp_path):
    """A full disk or quota (here a file size limit: EFBIG from pyarrow's writer, which Ray Train
    persists checkpoints with, raised inside a chain as Ray Train would) is a write no retry makes:
    jobs.train stops on it at once instead of restarting into it. A dropped connection, or a
    permission (which may be a read's) unless the caller only writes, is not."""
    import errno
    import os
    import pickle
    import subprocess
    import sys

    from jobs.mistakes import refused_write

    code = (
        "import pickle, resource, signal, sys\n"
        "import pyarrow.fs\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        "    with pyarrow.fs.LocalFileSystem().open_output_stream(sys.argv[1]) as f:\n"
        "        f.write(b'x' * 100000)\n"
        "except OSError as exc:\n"
        "    sys.stdout.buffer.write(pickle.dumps(exc))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "checkpoint.pt")], capture_output=True, timeout=120)
    written = pickle.loads(result.stdout)
    try:
        try:
            raise written
        except OSError as exc:
            raise RuntimeError("persisting the checkpoint failed") from exc
    except RuntimeError as chained:
        assert refused_write(chained) is written and written.errno == errno.EFBIG
    assert refused_write(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))).errno == errno.ENOSPC
    for passing in (ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("timed out"), OSError(errno.EIO, "I/O error")):
        assert refused_write(passing) is None and refused_write(passing, permission=True) is None
    denied = PermissionError(errno.EACCES, "Permission denied")
    assert refused_write(denied) is None and refused_write(denied, permission=True) is denied


def test_a_mistake_in_a_ray_data_pipeline_is_told_from_the_traceback_it_arrives_as(ray_local):
    """--ingest ray-data: Ray Data raises a loader's error as a RayTaskError of its
    UserCodeException, the original exception's chain lost in pickling; only the traceback
    text names it."""
    from jobs.mistakes import mistake_in

    line = "a.json: image id 8 (8.png) decodes to 223x273 (after EXIF orientation) but the file says 216x273; fix its width/height"

    def load(batch):
        from maskrcnn.data import AnnotationError

        raise AnnotationError(line)

    with pytest.raises(Exception) as raised:
        ray_local.data.range(2).map_batches(load, batch_size=1).take_all()
    assert mistake_in(raised.value) == line, str(raised.value)[-2000:]


def _chain(cause):
    raise RuntimeError("a Ray Data pipeline failed") from cause


@pytest.mark.parametrize("where", ["train", pytest.param("val", marks=pytest.mark.slow)])
def test_annotations_that_do_not_fit_their_image_stop_the_run_at_once_in_one_line(where, sample, tmp_path):
    (train_ann, train_images), (val_ann, val_images) = sample["train"], sample["val"]
    if where == "train":  # read by a DataLoader process, whose error torch re-raises with its traceback
        train_images, wrong = _with_a_wider_image(train_ann, train_images, tmp_path / "train")
    else:  # read by rank 0's evaluation at the run's last step
        val_images, wrong = _with_a_wider_image(val_ann, val_images, tmp_path / "val")
    job = Job("jobs.train", [
        "--annotations", train_ann, "--images", train_images, "--val-annotations", val_ann, "--val-images", val_images,
        "--output", tmp_path / "run", *SMALL, "--num-workers", "1", "--batch-size", "2", "--max-steps", "4",
        "--log-every", "1",
    ])
    assert job.wait(300) == 2, job.output[-4000:]
    errors = [line for line in job.lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: training stopped: ") and wrong in errors[0], job.output[-4000:]
    assert "fix its width/height" in errors[0] and "Traceback" not in job.output, job.output[-4000:]
    assert start_steps(job.output) == [0], job.output[-4000:]  # one attempt: no restart into the same error


def test_jobs_evaluate_says_the_same_mistake_in_one_line(sample, tmp_path):
    """jobs.evaluate reads its images in DataLoader processes too: the same one line, exit 2."""
    val_ann, val_images = sample["val"]
    val_images, wrong = _with_a_wider_image(val_ann, val_images, tmp_path / "val")
    from maskrcnn.checkpoint import save_checkpoint
    from maskrcnn.config import get_preset
    from maskrcnn.modeling import build_model

    categories = json.loads(open(val_ann).read())["categories"]
    config = get_preset("small", num_classes=len(categories) + 1)
    save_checkpoint(str(tmp_path / "model.pt"), build_model(config), config, categories)
    job = Job("jobs.evaluate", ["--checkpoint", tmp_path / "model.pt", "--annotations", val_ann, "--images", val_images,
                                "--loader-workers", "1"])
    assert job.wait(120) == 2, job.output[-4000:]
    assert job.lines[-1].startswith("error: ") and wrong in job.lines[-1] and "fix its width/height" in job.lines[-1], job.output
    assert "Traceback" not in job.output, job.output[-4000:]
