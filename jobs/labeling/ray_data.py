"""The model in your own Ray Data pipeline: rows with an ``image`` in, rows with ``instances`` out.

    import ray
    from jobs.labeling.ray_data import MaskRCNNPredictor

    ds = ray.data.read_images("s3://bucket/photos/", mode="RGB", include_paths=True)
    ds = ds.map_batches(MaskRCNNPredictor, fn_constructor_kwargs={"checkpoint": "s3://bucket/model.pt"},
                        compute=ray.data.ActorPoolStrategy(size=2), batch_size=4, num_gpus=1)

Each input row's ``image`` is an H x W x 3 uint8 array (``read_images(mode="RGB")``); every other
column passes through. Each output row has those columns (not the image) and ``width``,
``height``, ``instances``, ``error`` and ``model`` exactly as in jobs.label's Parquet output
(jobs/labeling/rows.py). It is jobs.label's own model stage (``predict.LabelActor``: fast
path, batched forward, masks cropped, or counted into runs on a GPU, on the device) and row stage (``rows.rows_table``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from jobs.labeling.decode import image_columns
from jobs.labeling.predict import LabelActor
from jobs.labeling.rows import rows_table
from maskrcnn.inference import PreparedImage

OUTPUT_COLUMNS = ["width", "height", "instances", "error", "model"]


class MaskRCNNPredictor(LabelActor):
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
        super().__init__(
            checkpoint_uri=checkpoint, load_kwargs={"arch": arch, "categories": cats}, storage_options=storage_options,
            use_gpu=torch.cuda.is_available(), threads=threads, fast=not reference_path, precision=precision,
            max_batch=None,  # no cap: each batch map_batches hands over is one forward per padded size
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        images = batch["image"]
        count = len(images)
        prepared: list[PreparedImage | None] = [None] * count
        errors = np.asarray([""] * count, dtype=object)
        for i, image in enumerate(images):
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
                errors[i] = f"not an H x W x 3 uint8 image: {image.dtype} {image.shape}; read with mode='RGB'"
                continue
            tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # (3, H, W), as decoding gives it
            prepared[i] = PreparedImage(tensor, tuple(image.shape[:2]), False)
        rows = {
            "shard": np.zeros(count, np.int32),
            "index": np.arange(count, dtype=np.int32),
            "image_uri": np.asarray([""] * count, dtype=object),
            **image_columns(prepared),
            "error": errors,
        }
        predictor = self.predictor
        labelled = rows_table(super().__call__(rows), label_map=predictor.label_map, model_hash=predictor.model_hash)
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
