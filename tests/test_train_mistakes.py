"""jobs.train meets a mistake in its inputs only once training reads them: a COCO file whose
width/height do not fit an image (found when the image is decoded, in a DataLoader process or in
an evaluation). A restart from the last checkpoint (--max-failures) would meet it again, so the
job ends at the first with one line naming it, exit 2, no traceback, and no second attempt.
``python -m jobs.train`` subprocesses, each with its own local Ray, as users run them."""

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


@pytest.mark.parametrize("where", ["train", "val"])
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
