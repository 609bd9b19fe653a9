"""`--smoke-test`: a profile shrunk until the whole pipeline runs in seconds to a few minutes on a CPU.

Reference profiles (CIFAR, ImageNet) keep their exact search and retrain networks, so the smoke run
proves those build and train, and swap the data for FakeData of the real shape with a couple of steps
per stage. The Fashion-MNIST profiles become the `tiny` preset (2–3 cells, C=8, 16×16 FakeData).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import RunConfig

REAL_SHAPES = {"cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "imagenet": (3, 224, 1000)}


def smoke_dict(base: RunConfig, tiny: dict[str, Any]) -> dict[str, Any]:
    """The smoke-test version of `base` as a plain dict (overrides are applied to it afterwards);
    `tiny` is the tiny profile, what a Fashion-MNIST profile becomes."""
    ds = base.data.dataset
    if ds not in REAL_SHAPES and ds != "imagefolder":
        return tiny | {"ray": base.ray.model_dump(mode="json") | tiny.get("ray", {})}
    channels, size, classes = REAL_SHAPES.get(
        ds, (3, base.data.image_size or 224, base.data.num_classes or 10)
    )
    d = base.model_dump(mode="json")
    bs = 8
    d["data"] = {
        "dataset": "fake", "image_size": size, "channels": channels, "num_classes": classes,
        "fake_size": 8 * bs, "augment": base.data.augment, "cutout": base.data.cutout, "seed": base.data.seed,
    }  # fmt: skip
    d["search"].update(epochs=2, warmup_epochs=1, max_steps_per_epoch=1, batch_size=bs, log_every=1)
    d["search"]["distill"]["teacher"].update(epochs=1, batch_size=bs)
    d["teacher"].update(max_steps_per_epoch=1)
    d["retrain"].update(epochs=1, batch_size=bs, max_steps_per_epoch=2)
    d["retrain_data"] = {"train_subset": "same"}
    d["sweep"] = {}
    d["ray"]["workers"] = 1  # a smoke run needs no cluster
    return d
