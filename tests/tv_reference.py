"""torchvision's Mask R-CNN with weights that give confident detections, for parity tests and benchmarks.

Random weights prove little (no confident detections), and a randomly initialised ResNet with
frozen BatchNorm diverges. So: calibrate BatchNorm statistics on the images, freeze the trunk,
and train the rest for a few steps until the scores are confident.
"""

from __future__ import annotations

import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

NUM_CLASSES = 3


def synthetic_batch(generator: torch.Generator, count: int = 2, size=(200, 260)):
    """Bright rectangles of two classes on dark noise, with exact masks."""
    h, w = size
    images, targets = [], []
    for _ in range(count):
        image = torch.rand(3, h, w, generator=generator) * 0.3
        boxes, labels, masks = [], [], []
        for k in range(3):
            x = int(torch.randint(0, w - 80, (1,), generator=generator))
            y = int(torch.randint(0, h - 80, (1,), generator=generator))
            bw = int(torch.randint(30, 70, (1,), generator=generator))
            bh = int(torch.randint(30, 70, (1,), generator=generator))
            label = k % 2 + 1
            mask = torch.zeros(h, w, dtype=torch.uint8)
            mask[y:y + bh, x:x + bw] = 1
            image[label - 1, y:y + bh, x:x + bw] = 0.9
            boxes.append([x, y, x + bw, y + bh])
            labels.append(label)
            masks.append(mask)
        images.append(image)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels), "masks": torch.stack(masks)})
    return images, targets


def calibrate_trunk_batch_norm(model: torch.nn.Module, images: list[torch.Tensor]) -> None:
    """A torchvision detection model's trunk BatchNorm statistics measured on ``images`` (a
    random trunk with identity statistics blows up); leaves the model in training mode."""
    for module in model.backbone.body.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batch
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        batch, _ = model.transform(images)
        model.backbone.body(batch.tensors)


def trained_torchvision_state(steps: int = 30, seed: int = 0) -> dict[str, torch.Tensor]:
    """``maskrcnn_resnet50_fpn``'s weights, trained on 224-320 px images with 128 RoIs sampled per
    image for the box head (torchvision's default 512 doubles the step, 36% of which was its
    single-threaded RoIAlign backward on a 2-core AVX2 CPU)."""
    torch.manual_seed(seed)
    model = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=224, max_size=320, box_batch_size_per_image=128
    )
    return _train(model, steps, seed, lambda params: torch.optim.SGD(params, lr=0.005, momentum=0.9))


def trained_torchvision_v2_state(steps: int = 20, seed: int = 0) -> dict[str, torch.Tensor]:
    """``maskrcnn_resnet50_fpn_v2``'s weights, trained as above but quicker per step (160-240 px
    images, 32 RoIs sampled per image for its conv box head) at a higher lr, then the BatchNorm
    statistics of its FPN and heads measured on the images (their running averages lag)."""
    torch.manual_seed(seed)
    model = maskrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=160, max_size=240, box_batch_size_per_image=32
    )
    return _train(model, steps, seed, lambda params: torch.optim.SGD(params, lr=0.02, momentum=0.9), calibrate_heads=True)


def _train(model: torch.nn.Module, steps: int, seed: int, make_optimizer, calibrate_heads: bool = False) -> dict[str, torch.Tensor]:
    """``model`` with its trunk's BatchNorm statistics measured and the trunk frozen, the rest
    trained for ``steps`` on the synthetic images; its state dict in eval mode."""
    images, targets = synthetic_batch(torch.Generator().manual_seed(seed + 1))
    calibrate_trunk_batch_norm(model, images)
    for param in model.backbone.body.parameters():
        param.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params)
    model.backbone.body.eval()
    for _ in range(steps):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
    if calibrate_heads:
        trunk = set(model.backbone.body.modules())
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d) and module not in trunk:
                module.momentum = None  # cumulative average over one training-mode pass
                module.reset_running_stats()
        with torch.no_grad():
            model(images, targets)
    model.eval()
    return model.state_dict()
