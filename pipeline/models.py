"""The model folders of a run (`OUTPUT/models/<arch_id>/`): written by each retrain trial when it
finishes, re-exported by `pipeline/export.py`, re-timed by `pipeline/profile.py`. No Ray in here.

A trial writes the weights and the model card first, then the ONNX file, then the latency measured
on its own machine (`dnad.latency`), each step rewriting the card; the trial reports itself done only
after the last, so a trial stopped part-way redoes the folder when it resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dnad.deploy import ONNX, export_onnx, load_model, read_card, save_model, write_card
from pipeline.config import DeployConfig, RunConfig


def base_card(cfg: RunConfig, loop: Any, data: Any) -> dict[str, Any]:
    """Everything a model card says about how the model was made and how well it did."""
    from dnad.complexity import count_complexity
    from dnad.data import preprocess_spec

    rec = loop.history[-1]
    shape = (data.in_channels, data.image_size, data.image_size)
    c = count_complexity(loop.model, shape)
    dcfg = cfg.retrain_data_config()
    return {
        "run": cfg.name,
        "dataset": data.name,
        "classes": list(data.classes),
        "normalisation": {"mean": list(data.mean), "std": list(data.std), "of": "pixel / 255, per channel"},
        "preprocess": preprocess_spec(data),
        "params": c.params,
        "macs": c.macs,
        "ptflops_backend": c.backend,
        "ptflops_version": c.ptflops_version,
        "val_acc": rec["val_acc"],
        "test_acc": rec["test_acc"],
        "images": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "epochs": loop.epoch,
        "recipe": {"retrain": cfg.retrain.model_dump(mode="json"), "data": dcfg.model_dump(mode="json")},
    }


def export_and_time(
    folder: Path,
    model: torch.nn.Module,
    deploy: DeployConfig,
    device: torch.device | str,
    threads: int,
    reexport: bool = True,
) -> dict[str, Any]:
    """Export `folder/model.onnx` (when `deploy.onnx`; with `reexport=False` an existing file of the
    same opset whose hash matches the card is kept), time the model and the ONNX file on this machine
    and record both in the card, which is rewritten after each step. Returns the card."""
    from dnad.deploy import verify_file
    from dnad.latency import measure

    card = read_card(folder)
    onnx_path = folder / ONNX if deploy.onnx else None
    if onnx_path is not None:
        kept = card.get("onnx") or {}
        if reexport or not onnx_path.is_file() or kept.get("opset") != deploy.opset:
            card["onnx"] = export_onnx(model, onnx_path, deploy.opset, deploy.exporter)
            write_card(folder, card)
        else:
            verify_file(folder, ONNX, kept.get("sha256"))
    card["latency"] = measure(
        model, onnx_path, deploy.batches(), deploy.latency_runs, deploy.latency_warmup, device, threads
    )
    write_card(folder, card)
    return card


def write_model_folder(ctx: Any, loop: Any, data: Any, device: torch.device, threads: int) -> Path:
    """A finished retrain trial's `models/<arch_id>/`: weights + card, ONNX, latency on this machine."""
    from dnad.deploy import models_dir

    model = loop.model
    folder = models_dir(ctx.out) / model.genotype.arch_id
    save_model(folder, model, base_card(ctx.cfg, loop, data))
    export_and_time(folder, model.eval(), ctx.cfg.deploy, device, threads)
    return folder


def reprofile(folder: Path, deploy: DeployConfig, threads: int, device: str = "cpu") -> dict[str, Any]:
    """Re-measure one model folder's latency here, from the folder alone (`dnad.load_model`); the ONNX
    file is exported only when it is missing or of another opset."""
    return export_and_time(folder, load_model(folder, device), deploy, device, threads, reexport=False)


def run_config(output: str | Path) -> RunConfig:
    """The resolved config a run saved (`OUTPUT/config.yaml`); defaults for a folder without one."""
    from pipeline.config import read_yaml, validate

    path = Path(output) / "config.yaml"
    return validate(read_yaml(path, "OUTPUT")) if path.is_file() else RunConfig()
