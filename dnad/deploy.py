"""Retrained models as self-contained folders a user can load, export, time and call. No Ray in here.

    OUTPUT/models/<arch_id>/
        model.safetensors   final-epoch weights (auxiliary head left out)
        genotype.json       the architecture (canonical JSON)
        model.json          the model card: format, network shape, input shape and normalisation, class
                            names, params/MACs (ptflops backend), validation/test accuracy, latency,
                            retrain recipe, arch id, sha256 of the weights (and of model.onnx)
        model.onnx          the same network in ONNX (dynamic batch axis), from `export_onnx`

`load_model(folder)` rebuilds the network from that folder alone and refuses weights whose sha256 is
not the card's. Inputs are float32 (N, C, H, W) images normalised as the card says:
`(pixel / 255 - mean) / std` per channel; `read_image` does that for an image file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dnad.checkpoint import atomic_write_text, file_mode, sha256_file
from dnad.config import EXPORTERS, ONNX_OPSET
from dnad.errors import InputError
from dnad.genotype import Genotype

MODEL_FORMAT = 1
WEIGHTS, CARD, GENOTYPE, ONNX = "model.safetensors", "model.json", "genotype.json", "model.onnx"
MODELS_DIR = "models"


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The inference weights: the state dict without the auxiliary head, contiguous CPU tensors."""
    return {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith("aux_head.")
    }


def save_model(folder: str | Path, model: nn.Module, card: dict[str, Any]) -> Path:
    """Write `folder` (weights, genotype, model card) from a trained `dnad.network.Network`.

    The folder appears whole or not at all: everything is written into a temporary sibling that then
    replaces it. `card` holds what the network cannot tell (normalisation, classes, accuracies,
    recipe, ...); the network's own shape, the arch id and the weights' sha256 are added here.
    """
    from safetensors.torch import save_file

    from dnad.network import Network

    if not isinstance(model, Network):
        raise TypeError(f"save_model needs a dnad Network, got {type(model).__name__}")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(_weights(model), str(tmp / WEIGHTS))
        with open(tmp / WEIGHTS, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp / WEIGHTS, file_mode())
        model.genotype.save(tmp / GENOTYPE)
        g = model.genotype
        full = {
            **card,
            "format_version": MODEL_FORMAT,
            "arch_id": g.arch_id,
            "network": {
                "C": model.C,
                "cells": g.num_cells,
                "stem": model.stem_kind,
                "num_classes": model.num_classes,
                "in_channels": model.in_channels,
                "image_size": model.image_size,
                "kept_pairs": g.num_pairs,
            },
            "input_shape": [1, model.in_channels, model.image_size, model.image_size],
            "weights_sha256": sha256_file(tmp / WEIGHTS),
        }
        atomic_write_text(tmp / CARD, json.dumps(full, indent=1, sort_keys=True, default=_json_default))
        tmp.chmod(file_mode(directory=True))
        _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _swap_in(tmp: Path, folder: Path) -> None:
    """Replace `folder` by `tmp` (rename; an existing folder is moved aside first, then removed)."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, tuple | set):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read_card(folder: str | Path) -> dict[str, Any]:
    """The model card of a model folder; InputError when the folder is not one."""
    folder = Path(folder)
    path = folder / CARD
    if not folder.is_dir():
        raise InputError("model", str(folder), "no such folder; give a folder OUTPUT/models/<arch_id>")
    try:
        card = json.loads(path.read_text())
    except OSError:
        raise InputError(
            "model", str(folder), f"no {CARD}: not a dnad model folder (OUTPUT/models/<arch_id>)"
        ) from None
    except ValueError as e:
        raise InputError("model", str(path), f"not valid JSON ({e})") from None
    if not isinstance(card, dict) or card.get("format_version") != MODEL_FORMAT:
        got = card.get("format_version") if isinstance(card, dict) else None
        raise InputError("model", str(path), f"model format {got!r}, this dnad reads format {MODEL_FORMAT}")
    return card


def write_card(folder: str | Path, card: dict[str, Any]) -> None:
    """Rewrite a model card in place (atomic), e.g. after re-measuring latency or exporting ONNX."""
    atomic_write_text(Path(folder) / CARD, json.dumps(card, indent=1, sort_keys=True, default=_json_default))


def verify_file(folder: Path, name: str, digest: str | None) -> Path:
    """`folder/name`, checked against its sha256 in the card; InputError when missing or different."""
    path = folder / name
    if not path.is_file():
        raise InputError("model", str(path), "missing; the model folder is incomplete")
    if digest is None or sha256_file(path) != digest:
        raise InputError(
            "model", str(path), f"sha256 differs from the one in {CARD} (tampered with or truncated); "
            "copy the folder again or re-run the export"
        )  # fmt: skip
    return path


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The network of a model folder, in eval mode, on `device`, with its card as `model.card`.

    Only `folder` is read: the architecture from genotype.json, the shape from model.json, the
    weights from model.safetensors (safetensors: no pickle), which must match the card's sha256.
    A missing or tampered file or weights of another shape raise `InputError` (one line).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from dnad.network import build_model

    folder = Path(folder)
    card = read_card(folder)
    weights = verify_file(folder, WEIGHTS, card.get("weights_sha256"))
    try:
        g = Genotype.load(folder / GENOTYPE)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError("model", str(folder / GENOTYPE), f"unreadable genotype ({e})") from None
    if g.arch_id != card.get("arch_id"):
        raise InputError(
            "model", str(folder / GENOTYPE), f"its id {g.arch_id} is not the card's {card.get('arch_id')}"
        )
    n = card["network"]
    model = build_model(g, n["C"], n["num_classes"], n["in_channels"], n["image_size"], n["stem"])
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError("model", str(weights), f"unreadable weights ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise InputError(
            "model", str(weights), f"the weights do not fit the architecture ({first})"
        ) from None
    model.card = card
    return model.to(device).eval()


def models_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / MODELS_DIR


def model_folders(output_dir: str | Path) -> dict[str, Path]:
    """`{arch_id: folder}` of the model folders of a run (those holding a model card)."""
    root = models_dir(output_dir)
    if not root.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (p / CARD).is_file()
    }


# -- ONNX --------------------------------------------------------------------------------------
def export_onnx(
    model: nn.Module, path: str | Path, opset: int = ONNX_OPSET, exporter: str = "dynamo"
) -> dict[str, Any]:
    """Export an eval-mode network to ONNX with a dynamic batch axis (input "input", output "logits").

    `exporter`: "dynamo" (torch.export + the onnxscript optimiser: the leaner graph, about 10 % faster
    in ONNX Runtime here, but 10-20 s per network on one CPU thread) or "torchscript" (the tracing
    exporter: about 1 s, the same logits). What is exported is `dnad.fold.fold_batchnorm(model)`: the
    BNs folded into their convs (`model` is not changed), which halves the dynamo export's time and
    gives ONNX Runtime the same graph its own optimiser would make. Runs under `reference_kernels()`
    (plain convolutions: the CPU fast paths are PyTorch-level rewrites of the same math). Written
    atomically. Returns what the model card records about it.
    """
    import warnings

    from dnad.fastops import reference_kernels
    from dnad.fold import fold_batchnorm

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")
    path = Path(path)
    model = fold_batchnorm(model)
    p = next(model.parameters())
    x = torch.zeros(
        (2, model.in_channels, model.image_size, model.image_size), dtype=p.dtype, device=p.device
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    names = {"input_names": ["input"], "output_names": ["logits"], "opset_version": opset, "verbose": False}
    try:
        with reference_kernels(), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1, max=1 << 16)
                program = torch.onnx.export(
                    model, (x,), None, dynamic_shapes=({0: batch},), dynamo=True, **names
                )
                program.save(tmp)
            else:
                torch.onnx.export(model, (x,), tmp, dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                                  dynamo=False, **names)  # fmt: skip
        digest = sha256_file(Path(tmp))
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {
        "opset": opset, "file": path.name, "sha256": digest,
        "exporter": f"torch.onnx ({exporter}) {torch.__version__}", "input": "input", "output": "logits",
        "dynamic_axes": {"input": [0], "logits": [0]}, "batchnorm_folded": True,
    }  # fmt: skip


# -- inputs --------------------------------------------------------------------------------------
def read_image(path: str | Path, card: dict[str, Any]) -> torch.Tensor:
    """An image file as the network input the model was trained on: float32 (C, S, S), converted to the
    card's PIL mode (grayscale stays 1 channel), the centred square of `crop_ratio` × the shorter side
    resized to S, normalised with the card's mean/std. InputError when the file is not a readable
    image."""
    from PIL import Image, UnidentifiedImageError

    from dnad.data import centre_crop

    pre, norm = card["preprocess"], card["normalisation"]
    try:
        with Image.open(path) as img:
            img = img.convert(pre["mode"])
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise InputError("image", str(path), f"not a readable image ({type(e).__name__}: {e})") from None
    x = centre_crop(img, int(pre["image_size"]), float(pre["crop_ratio"])).float().div_(255.0)
    mean = torch.tensor(norm["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(norm["std"], dtype=torch.float32).view(-1, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def top_k(model: nn.Module, x: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
    """The k most probable (class name, probability) of each input of the batch `x` (N, C, S, S)."""
    p = next(model.parameters())
    probs = torch.softmax(model(x.to(p.device)).float(), dim=1).cpu()
    names = list(model.card["classes"])
    k = min(k, probs.shape[1])
    vals, idx = probs.topk(k, dim=1)
    return [[(names[j], float(v)) for v, j in zip(vr.tolist(), ir.tolist())] for vr, ir in zip(vals, idx)]
