"""maskrcnn.storage: one way to open local paths, file:// and s3:// URIs."""

from __future__ import annotations

import json

import fsspec
import pytest

from maskrcnn.s3 import _s3_options
from maskrcnn.storage import filesystem, join_uri, open_uri


@pytest.mark.parametrize(
    "base, parts, expected",
    [
        ("/data/coco", ("images", "a.png"), "/data/coco/images/a.png"),
        ("/data/coco/", ("/images/", "a.png"), "/data/coco/images/a.png"),
        ("relative/dir", ("a.png",), "relative/dir/a.png"),
        ("file:///tmp/x", ("y", "z.json"), "file:///tmp/x/y/z.json"),
        ("s3://bucket", ("train", "annotations.json"), "s3://bucket/train/annotations.json"),
        ("s3://bucket/prefix/", ("a/b.png",), "s3://bucket/prefix/a/b.png"),
        ("s3://", ("bucket", "key"), "s3://bucket/key"),
        ("s3://bucket/x", (), "s3://bucket/x"),
        ("s3://bucket/x", ("", "/"), "s3://bucket/x"),
        ("", ("a", "b"), "a/b"),
    ],
)
def test_join_uri(base, parts, expected):
    assert join_uri(base, *parts) == expected


def test_open_uri_local_creates_parents_and_round_trips(tmp_path):
    uri = str(tmp_path / "deep" / "er" / "file.bin")
    with open_uri(uri, "wb") as f:
        f.write(b"\x00\x01payload")
    with open_uri(uri) as f:
        assert f.read() == b"\x00\x01payload"
    text_uri = "file://" + str(tmp_path / "other" / "note.txt")
    with open_uri(text_uri, "w") as f:
        f.write("héllo")
    with open_uri(text_uri, "r") as f:
        assert f.read() == "héllo"


def test_filesystem_local(tmp_path):
    fs, path = filesystem(str(tmp_path))
    assert isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    assert path == str(tmp_path)
    fs, path = filesystem("file://" + str(tmp_path / "a"))
    assert path == str(tmp_path / "a")


def test_open_uri_missing_local_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_uri(str(tmp_path / "nope.json"))


def test_s3_options_from_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env-endpoint:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert _s3_options({}) == {"client_kwargs": {"endpoint_url": "http://env-endpoint:9000", "region_name": "eu-west-3"}}
    # Explicit options win over the environment, in either place s3fs accepts them.
    assert _s3_options({"endpoint_url": "http://x"})["client_kwargs"] == {"region_name": "eu-west-3"}
    explicit = {"client_kwargs": {"endpoint_url": "http://y", "region_name": "us-east-2"}}
    assert _s3_options(explicit) == explicit
    # The service-specific variable wins, as in botocore.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:9000")
    assert _s3_options({})["client_kwargs"]["endpoint_url"] == "http://s3-only:9000"
    # botocore reads AWS_DEFAULT_REGION itself: leave it to it.
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert "region_name" not in _s3_options({})["client_kwargs"]


def test_s3_round_trip_with_environment_only(s3_bucket):
    """The endpoint and credentials come from the AWS variables the fixture set, nothing else."""
    uri = join_uri(s3_bucket, "some/prefix", "blob.bin")
    with open_uri(uri, "wb") as f:
        f.write(b"bytes on s3")
    with open_uri(uri) as f:
        assert f.read() == b"bytes on s3"
    fs, path = filesystem(uri)
    assert path == uri[len("s3://"):]
    assert fs.exists(path)


def test_s3_with_storage_options(s3_bucket, s3_server):
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_server}}
    uri = join_uri(s3_bucket, "x.txt")
    with open_uri(uri, "w", storage_options=options) as f:
        f.write("text")
    with open_uri(uri, "r", storage_options=options) as f:
        assert f.read() == "text"


def test_storage_options_a_store_cannot_take_are_named(s3_bucket, s3_server):
    """--storage-options that s3fs would take only to fail deep in botocore: a nested option that
    is not an object is refused as it is parsed; an unknown option's error says to check them."""
    from jobs.common import JobError
    from jobs.options import parse_storage_options
    from maskrcnn.storage import explain_storage_error

    for text in ('{"config_kwargs": [1, 2]}', '{"client_kwargs": "x"}'):
        name = next(iter(json.loads(text)))
        with pytest.raises(JobError, match=rf"^--storage-options' {name} must be a JSON object, got "):
            parse_storage_options(text)
    options = {**parse_storage_options('{"bogus": 3}'), "key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_server}}
    with pytest.raises(TypeError) as info:
        with open_uri(join_uri(s3_bucket, "x.txt"), storage_options=options) as f:
            f.read()
    assert explain_storage_error(info.value).endswith("): check --storage-options"), explain_storage_error(info.value)
    assert "'bogus'" in explain_storage_error(info.value)


def test_errors_do_not_show_secrets(s3_bucket, s3_server):
    secret = "do-not-print-this-secret"
    options = {"key": "testing", "secret": secret, "client_kwargs": {"endpoint_url": s3_server}}
    with pytest.raises(Exception) as info:
        with open_uri(join_uri(s3_bucket, "missing.bin"), storage_options=options) as f:
            f.read()
    assert secret not in str(info.value) and secret not in repr(info.value)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_folder_given_for_a_file_is_named_as_a_folder(where, tmp_path, request):
    """A folder (an object store's prefix, which s3fs opens as an empty file) given where a file is
    read: IsADirectoryError from open_uri, and the jobs' one line says it is a folder; an empty
    file stays an empty file."""
    from jobs.common import JobError
    from jobs.evaluate import main as evaluate_main
    from jobs.train import main as train_main

    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    with open_uri(f"{base}/data/annotations.json", "w") as f:
        f.write("{}")
    with open_uri(f"{base}/empty.json", "w") as f:
        pass
    with pytest.raises(IsADirectoryError):
        open_uri(f"{base}/data")
    with pytest.raises(IsADirectoryError):
        open_uri(f"{base}/data/", "r")
    with open_uri(f"{base}/empty.json") as f:
        assert f.read() == b""
    folder = f"{base}/data"
    with pytest.raises(JobError, match=rf"^cannot read --annotations {folder}: it is a folder; give the file$"):
        train_main(["--annotations", folder, "--images", folder, "--output", str(tmp_path / "run"), "--arch", "small"])
    with pytest.raises(JobError, match=rf"^cannot read --annotations {folder}: it is a folder; give the file$"):
        evaluate_main(["--checkpoint", str(tmp_path / "model.pt"), "--annotations", folder, "--images", folder])
    assert not (tmp_path / "run").exists()


def test_a_write_that_fails_leaves_no_partial_file(tmp_path):
    """put_atomic on a disk that refuses the bytes (here: a file size limit, EFBIG, as ENOSPC on a
    full disk) raises, and leaves neither the file nor its temporary beside it."""
    import os
    import subprocess
    import sys

    code = (
        "import resource, signal, sys\n"
        "from maskrcnn.storage import filesystem, put_atomic\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "fs, path = filesystem(sys.argv[1])\n"
        "put_atomic(fs, path + '/small.bin', b'x' * 1000)\n"
        "try:\n"
        "    put_atomic(fs, path + '/big.bin', b'x' * 100000)\n"
        "except OSError as exc:\n"
        "    print('refused', exc.errno)\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=repo)
    assert result.returncode == 0 and result.stdout.startswith("refused "), result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.bin"]
