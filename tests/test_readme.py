"""The README's code runs as written: its quick start, its Python snippets, its reading of the
output, and its quick reference of the jobs' options.

A code block preceded by ``<!-- test: NAME -->`` is run here, in a folder holding the files it
names: ``my_photos/`` (sample images), ``photo.jpg``, ``model.pt`` (the ``small`` preset, random
weights) and, for the quick start, torchvision's COCO file name holding a random 91-class
state dict. Only file contents stand in; the code is the README's.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.labeling.rows import INSTANCE_TYPE, OUTPUT_SCHEMA
from tests.labeling_helpers import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
NUM_IMAGES = 5
COCO_FILE = "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"


def readme_blocks() -> dict[str, tuple[str, str]]:
    """name -> (language, code) of every block marked ``<!-- test: name -->``."""
    found = re.findall(r"<!-- test: ([\w-]+) -->\n```(\w+)\n(.*?)```", README, flags=re.S)
    blocks = {name: (lang, code) for name, lang, code in found}
    assert len(blocks) == len(found), "two README blocks share a test name"
    return blocks


BLOCKS = readme_blocks()


def run_block(name: str, namespace: dict | None = None) -> dict:
    lang, code = BLOCKS[name]
    assert lang == "python"
    namespace = {} if namespace is None else namespace
    exec(compile(code, f"README.md <!-- test: {name} -->", "exec"), namespace)
    return namespace


def run_in_fresh_python(folder: Path, names: list[str], checks: str) -> None:
    """Runs the README blocks ``names``, then ``checks``, in a new Python in ``folder``: as in a
    user's session, Ray (started by Ray Data) runs there, so the README's relative paths hold."""
    code = "\n".join(BLOCKS[name][1] for name in names) + "\n" + checks
    # a private Ray, never another program's `ray start` head on this machine
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def make_photos(folder: Path) -> None:
    from PIL import Image

    from maskrcnn.data.synthetic import make_split

    make_split(str(folder / "sample"), "val", NUM_IMAGES)
    (folder / "my_photos").mkdir()
    for path in sorted((folder / "sample/val/images").glob("*.png")):
        shutil.copy(path, folder / "my_photos" / path.name)
    Image.open(path).convert("RGB").save(folder / "photo.jpg", quality=95)
    shutil.rmtree(folder / "sample")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    make_photos(folder)
    make_checkpoint(str(folder / "model.pt"))
    return folder


@pytest.fixture(scope="module")
def labelled(workdir, ray_local):
    """``labels/`` made by the README's ``label`` snippet."""
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        run_block("label")
    finally:
        os.chdir(cwd)
    return workdir


def test_every_python_block_of_the_readme_is_tested():
    python_blocks = len(re.findall(r"^```python$", README, flags=re.M))
    assert python_blocks == sum(lang == "python" for lang, _ in BLOCKS.values())
    assert {"quickstart", "read", "model", "label", "ray-data"} <= set(BLOCKS)


@pytest.mark.slow
def test_quickstart_as_written(tmp_path):
    """The local-folder command of "Label your own images", on a random-weight state dict with
    the shape of torchvision's COCO checkpoint: it loads without --categories and labels every
    image."""
    import torch
    import torchvision

    make_photos(tmp_path)
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    torch.save(model.state_dict(), tmp_path / COCO_FILE)
    lang, code = BLOCKS["quickstart"]
    assert lang == "bash"
    argv = shlex.split(code.replace("\\\n", " ").splitlines()[0])  # the first command: a local folder
    assert argv[:3] == ["python", "-m", "jobs.label"]
    # a private Ray for this run, never another program's `ray start` head on this machine
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "categories: COCO's 80 (maskrcnn/data/coco_categories.json)" in result.stdout
    table = pq.read_table(glob.glob(str(tmp_path / "labels/part-*.parquet")))
    assert sorted(table.column("image_uri").to_pylist()) == sorted(str(p) for p in (tmp_path / "my_photos").iterdir())
    assert table.column("error").null_count == NUM_IMAGES


def test_label_from_python(labelled):
    table = pq.read_table(glob.glob(str(labelled / "labels/part-*.parquet")))
    assert table.schema == OUTPUT_SCHEMA
    # a local folder is listed with absolute paths: Ray's workers may run in another directory
    assert sorted(table.column("image_uri").to_pylist()) == sorted(str(p) for p in (labelled / "my_photos").iterdir())
    assert table.column("error").null_count == NUM_IMAGES
    from jobs.label import label

    with pytest.raises(TypeError, match="bach_size"):
        label("my_photos/", "labels/", "model.pt", bach_size=2)


def test_read_the_output_as_the_readme_shows(labelled):
    """DuckDB, pandas and Ray Data read exactly the label rows, not the ``_plan/`` bookkeeping
    beside them; a mask decodes to its image's size and area."""
    plan = labelled / "labels/_plan"
    assert list(plan.glob("**/*.plan")) and not list(plan.glob("**/*.parquet"))  # no reader's glob takes it for labels
    run_in_fresh_python(labelled, ["read"], f"""
columns = {OUTPUT_SCHEMA.names!r}
assert len(df) == {NUM_IMAGES} and list(df.columns) == columns, df.columns
assert ds.count() == {NUM_IMAGES} and ds.schema().names == columns
assert len(per_image) == {NUM_IMAGES} and per_image["image_uri"].is_unique
assert (per_image["found"] > 0).all()  # the random small model detects in every image
assert list(confident.columns) == ["image_uri", "category", "score", "bbox"] and (confident["score"] >= 0.5).all()
everything = duckdb.sql("SELECT count(*) FROM (SELECT unnest(instances) FROM read_parquet('labels/*.parquet'))").fetchall()[0][0]
assert everything == per_image["found"].sum() == sum(len(v) for v in df["instances"]) > len(confident)
assert mask.shape == (df.iloc[0]["height"], df.iloc[0]["width"]), mask.shape
assert int(mask.sum()) == instance["area"] > 0
""")

    # and its COCO export, as the README gives it
    import json

    command = shlex.split(re.search(r"`(python -m jobs\.export_coco [^`]*)`", README)[1])
    result = subprocess.run([sys.executable, *command[1:]], cwd=labelled, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    coco = json.loads((labelled / command[command.index("--output") + 1]).read_text())
    assert len(coco["images"]) == NUM_IMAGES and len(coco["annotations"]) == 50 * NUM_IMAGES  # the small model's 50 each


def test_model_snippet(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    ns = run_block("model")
    found, names, rles = ns["found"], ns["names"], ns["rles"]
    assert len(names) == len(found.labels) == len(rles) > 0 and found.boxes.shape == (len(names), 4)
    assert set(names) <= {"circle", "square", "triangle"}
    from PIL import Image

    width, height = Image.open(workdir / "photo.jpg").size
    assert all(rle["size"] == [height, width] for rle in rles) and (ns["areas"] > 0).all()


def test_ray_data_snippet(labelled):
    """The README's Ray Data pipeline gives the rows jobs.label gives for the same images."""
    run_in_fresh_python(labelled, ["ray-data"], "")
    table = pq.read_table(str(labelled / "my_labels"))
    assert table.num_rows == NUM_IMAGES
    assert table.column_names == ["path", "width", "height", "instances", "error", "model"]
    assert table.schema.field("instances").type.value_type == INSTANCE_TYPE
    assert table.column("error").null_count == NUM_IMAGES
    assert min(len(v) for v in table.column("instances").to_pylist()) > 0
    labels = pq.read_table(glob.glob(str(labelled / "labels/part-*.parquet")))
    ours = {os.path.basename(u): v for u, v in zip(labels.column("image_uri").to_pylist(), labels.column("instances").to_pylist())}
    theirs = {os.path.basename(u): v for u, v in zip(table.column("path").to_pylist(), table.column("instances").to_pylist())}
    assert sorted(theirs) == sorted(ours) == sorted(os.listdir(labelled / "my_photos"))
    for name, instances in theirs.items():
        assert [(i["category"], i["mask"]) for i in instances] == [(i["category"], i["mask"]) for i in ours[name]]
    assert table.column("model").to_pylist() == labels.column("model").to_pylist()


def _options_of(job: str) -> set[str]:
    import importlib

    module = importlib.import_module(f"jobs.{job}")
    if hasattr(module, "build_parser"):
        return {s for action in module.build_parser()._actions for s in action.option_strings}
    text = subprocess.run([sys.executable, "-m", f"jobs.{job}", "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))


def test_quick_reference_matches_the_jobs():
    reference = README.split("## The jobs' command lines", 1)[1].split("```", 2)[1]
    seen = set()
    for line in reference.strip().splitlines():
        match = re.match(r"python -m jobs\.(\w+)", line)
        if match:
            job = match[1]
            seen.add(job)
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", line))
        unknown = options - _options_of(job)
        assert not unknown, f"README's quick reference gives jobs.{job} options it does not have: {sorted(unknown)}"
    assert seen == {"label", "train", "evaluate", "export_coco", "demo", "selftrain"}


def test_every_command_in_the_readme_parses():
    """Every ``python -m jobs.X ...`` of the README (its bash blocks and inline commands) names
    options the job has, and parses with the job's own parser where it has one."""
    import importlib

    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        lines += [line.split("#", 1)[0] for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`(python -m jobs\.[^`]*)`", README)
    commands = [shlex.split(line[line.index("python -m jobs."):]) for line in lines if "python -m jobs." in line]
    assert len(commands) >= 6
    for argv in commands:
        job = argv[2].split(".", 1)[1]
        unknown = {a for a in argv[3:] if a.startswith("--")} - _options_of(job)
        assert not unknown, f"{shlex.join(argv)}: unknown options {sorted(unknown)}"
        module = importlib.import_module(f"jobs.{job}")
        if hasattr(module, "build_parser"):
            module.build_parser().parse_args(argv[3:])


def test_readme_links_exist_and_it_stays_short():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), target
    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name}: {target}"
    assert len(README.splitlines()) < 200
