"""benchmarks.compare at a toy budget: it trains, scores and times the models it is given and
writes the chart and the table; its published COCO figures are torchvision's own."""

from __future__ import annotations

import re

import pytest

from benchmarks import compare


def test_compare_writes_chart_and_table(tmp_path):
    args = compare.build_parser().parse_args([
        "--models", "r50_fpn,ssdlite", "--steps", "2", "--images", "4", "--val-images", "2", "--min-size", "96",
        "--batch-sizes", "1,2", "--repeats", "1", "--output", str(tmp_path),
    ])
    results = compare.run(args)

    assert list(results) == ["r50_fpn", "ssdlite"]
    for key, r in results.items():
        assert 0.0 <= r["box_AP"] <= 1.0, key
        assert set(r["speed"]) == {1, 2} and all(v > 0 for v in r["speed"].values()), key
        assert not r["diverged"], key
    assert 0.0 <= results["r50_fpn"]["mask_AP"] <= 1.0
    assert results["ssdlite"]["mask_AP"] is None  # no mask head: no mask AP, not a zero

    assert (tmp_path / "speed_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "speed_accuracy.md").read_text()
    measured = markdown.split("## Measured here", 1)[1].split("## Published", 1)[0]
    rows = [line for line in measured.splitlines() if line.startswith("| ") and not line.startswith(("| model", "| ---"))]
    assert [row.split(" | ")[0][2:] for row in rows] == [compare.CONTENDERS[k].name for k in results]
    for row, r in zip(rows, results.values()):
        box_ap = float(row.split(" | ")[1])
        assert 0.0 <= box_ap <= 100.0 and box_ap == pytest.approx(100 * r["box_AP"], abs=0.051)
    published = markdown.split("## Published", 1)[1]
    assert len(re.findall(r"^\| .*COCO_V1", published, flags=re.M)) == 2
    assert "torch " in markdown and "torchvision " in markdown  # the versions it ran with


def test_published_figures_are_torchvisions():
    from torchvision.models import detection

    for key, contender in compare.CONTENDERS.items():
        enum_name, member = contender.published.weights.split(".")
        meta = getattr(getattr(detection, enum_name), member).meta
        metrics = meta.get("_metrics", {}).get("COCO-val2017")
        if metrics is None:  # an older torchvision keeps no metrics in its weights' meta
            continue
        assert metrics["box_map"] == contender.published.box_ap, key
        assert metrics.get("mask_map") == contender.published.mask_ap, key
        assert round(meta["num_params"] / 1e6, 1) == contender.published.params_m, key


def test_unknown_model_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exc:
        compare.main(["--models", "r50_fpn,yolov3"])
    assert exc.value.code == 2
    assert "yolov3" in capsys.readouterr().err
