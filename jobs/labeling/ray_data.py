"""The model in your own Ray Data pipeline: rows with an ``image`` in, rows with ``instances`` out.

    import ray
    from jobs.labeling.ray_data import MaskRCNNPredictor

    ds = ray.data.read_images("s3://bucket/photos/", mode="RGB", include_paths=True)
    ds = ds.map_batches(MaskRCNNPredictor, fn_constructor_kwargs={"checkpoint": "s3://bucket/model.pt"},
                        compute=ray.data.ActorPoolStrategy(size=2), batch_size=4, num_gpus=1)

Each input row's ``image`` is an H x W x 3 uint8 array (``read_images(mode="RGB")``); every other
column passes through. Each output row has those columns (not the image) and ``width``,
``height``, ``instances``, ``error`` and ``model`` exactly as in jobs.label's Parquet output
(jobs/labeling/schema.py). It is jobs.label's own model stage (``pipeline.Predictor``: fast
path, batched forward, masks cropped on the device) and mask encoder (``postprocess_batch``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import torch

from jobs.labeling.pipeline import LabelSettings, Predictor, postprocess_batch

OUTPUT_COLUMNS = ["width", "height", "instances", "error", "model"]


class MaskRCNNPredictor(Predictor):
    """A Ray Data callable class: one model per actor, loaded once.

    ``checkpoint``: a jobs.train model.pt or a torchvision state dict (then ``arch``, and
    ``categories``, a COCO JSON URI, unless it is torchvision's COCO one). ``precision``: auto
    (bf16 on GPUs, fp32 on CPUs), fp32, bf16, fp16. ``threads``: torch threads on the CPU. The
    actor runs on a GPU when Ray gives it one (``num_gpus=`` in ``map_batches``). Sizes,
    thresholds and detections per image are the checkpoint's (torchvision's 800, 1333, 0.05,
    100 for r50_fpn); filter ``instances`` by ``score`` downstream for a higher threshold.
    """

    def __init__(
        self,
        checkpoint: str,
        *,
        arch: str | None = None,
        categories: str | None = None,
        storage_options: dict | None = None,
        precision: str = "auto",
        reference_path: bool = False,
        threads: int = 1,
    ):
        from maskrcnn.checkpoint import categories_from_coco

        cats = categories_from_coco(categories, storage_options) if categories else None
        settings = LabelSettings(
            output_uri="",
            checkpoint_uri=checkpoint,
            load_kwargs={"arch": arch, "categories": cats},
            storage_options=storage_options,
            model_hash="",
            label_map={},
            min_size=0,
            max_size=0,
            max_pixels=0,
            batch_size=None,  # no cap: each batch map_batches hands over is one forward per padded size
            decode_batch_size=0,
            num_actors=1,
            gpus_per_actor=1.0 if torch.cuda.is_available() else 0.0,
            cpus_per_actor=float(threads),
            run_id="",
            fast_path=not reference_path,
            precision=precision,
        )
        super().__init__(settings)
        self.settings = dataclasses.replace(settings, label_map=self.label_map, model_hash=self.model_hash)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        images = batch["image"]
        count = len(images)
        rows = {
            "shard": np.zeros(count, np.int32),
            "index": np.arange(count, dtype=np.int32),
            "image_uri": np.asarray([""] * count, dtype=object),
            "height": np.full(count, -1, np.int32),
            "width": np.full(count, -1, np.int32),
            "tensor_height": np.zeros(count, np.int32),
            "tensor_width": np.zeros(count, np.int32),
            "resized": np.zeros(count, bool),
            "image": np.asarray([b""] * count, dtype=object),
            "error": np.asarray([""] * count, dtype=object),
        }
        for i, image in enumerate(images):
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
                rows["error"][i] = f"not an H x W x 3 uint8 image: {image.dtype} {image.shape}; read with mode='RGB'"
                continue
            height, width = image.shape[:2]
            rows["height"][i] = rows["tensor_height"][i] = height
            rows["width"][i] = rows["tensor_width"][i] = width
            rows["image"][i] = np.ascontiguousarray(image.transpose(2, 0, 1)).tobytes()  # (3, H, W), as decode sends it
        labelled = postprocess_batch(super().__call__(rows), self.settings)
        columns, names = [], []
        for name, values in batch.items():
            if name == "image" or name in OUTPUT_COLUMNS:
                continue
            values = np.asarray(values)
            if values.ndim > 1:
                from ray.data.extensions import ArrowTensorArray

                columns.append(ArrowTensorArray.from_numpy(values))
            else:
                columns.append(pa.array(values.tolist()))
            names.append(name)
        return pa.Table.from_arrays(columns + [labelled.column(c) for c in OUTPUT_COLUMNS], names=names + OUTPUT_COLUMNS)
