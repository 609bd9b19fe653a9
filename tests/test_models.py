"""Retrained models as folders a user can load, export, time and call (`dnad.deploy`, `pipeline/models.py`,
`pipeline/{export,profile,predict}.py`): on a small network trained on real Fashion-MNIST images, and on
the model folders a `--smoke-test` run leaves."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import dnad
from dnad.config import DataConfig
from dnad.data import load_dataset
from dnad.deploy import CARD, GENOTYPE, ONNX, WEIGHTS, export_onnx, load_model, read_card, read_image
from dnad.errors import InputError
from dnad.genotype import Genotype
from dnad.network import build_model
from dnad.retrain import RetrainLoop, evaluate
from pipeline.config import DeployConfig, RetrainStage, RunConfig
from pipeline.models import base_card, export_and_time
from pipeline.raytools import find_tcmalloc

REPO = Path(__file__).resolve().parent.parent
TEACHER_GENOTYPE = REPO / "configs" / "teachers" / "darts_v2_5cells.json"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, RunConfig]:
    """A 5-cell C=4 network trained two epochs on 2,000 real Fashion-MNIST images, written as a model
    folder the way a retrain trial writes it (weights + card, ONNX, latency)."""
    cfg = RunConfig(
        name="unit",
        data=DataConfig(train_subset=2000, val_size=500, test_subset=1000),
        retrain=RetrainStage(C=4, epochs=2, batch_size=64, optimizer="adamw", lr=0.006, auxiliary_weight=0.4,
                              drop_path=0.0),
    )  # fmt: skip
    data = load_dataset(cfg.data)
    torch.manual_seed(0)
    g = Genotype.load(TEACHER_GENOTYPE)
    model = build_model(g, 4, 10, 1, 28, auxiliary=True)
    loop = RetrainLoop(cfg.retrain, model, data, augment=False)
    loop.run()
    folder = tmp_path_factory.mktemp("models") / g.arch_id
    dnad.deploy.save_model(folder, loop.model, base_card(cfg, loop, data))
    export_and_time(folder, loop.model.eval(), DeployConfig(latency_batch=16), "cpu", 1)
    return folder, cfg


@pytest.mark.data
def test_the_folder_holds_weights_genotype_card_and_onnx(trained):
    folder, _ = trained
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS, GENOTYPE, CARD, ONNX])
    card = read_card(folder)
    assert card["format_version"] == 1 and card["arch_id"] == folder.name
    assert card["network"] == {"C": 4, "cells": 5, "stem": "cifar", "num_classes": 10, "in_channels": 1,
                               "image_size": 28, "kept_pairs": 40}  # fmt: skip
    assert card["input_shape"] == [1, 1, 28, 28] and card["classes"][0] == "T-shirt/top"
    assert card["normalisation"]["mean"] == [0.286] and card["normalisation"]["std"] == [0.353]
    assert card["preprocess"] == {"mode": "L", "image_size": 28, "crop_ratio": 1.0, "resample": "bilinear"}
    assert card["params"] > 0 and card["macs"] > 0 and card["ptflops_backend"] == "aten"
    assert 0.5 < card["val_acc"] <= 1 and 0.5 < card["test_acc"] <= 1  # trained: far above chance (0.1)
    assert card["images"] == {"train": 2000, "val": 500, "test": 1000}
    assert (
        card["recipe"]["retrain"]["optimizer"] == "adamw" and card["recipe"]["data"]["train_subset"] == 2000
    )
    assert card["onnx"]["opset"] == 18 and card["onnx"]["dynamic_axes"] == {"input": [0], "logits": [0]}
    assert card["onnx"]["batchnorm_folded"] is True
    lat = card["latency"]
    assert (
        lat["batches"] == [1, 16]
        and lat["threads"] == 1
        and lat["runs"] == 50
        and lat["statistic"] == "median"
    )
    assert set(lat["torch_ms"]) == set(lat["onnx_ms"]) == {"1", "16"}
    assert all(v > 0 for v in [*lat["torch_ms"].values(), *lat["onnx_ms"].values()])
    assert lat["torch_device"].startswith("cpu: ") and "onnxruntime" in lat["onnx_device"]
    from safetensors.torch import load_file

    assert not [k for k in load_file(str(folder / WEIGHTS)) if k.startswith("aux_head.")]  # no auxiliary head


@pytest.mark.data
def test_the_loaded_model_reproduces_the_recorded_accuracies_exactly(trained):
    folder, _ = trained
    model = dnad.load_model(folder)  # from the folder alone
    assert not model.training and model.aux_head is None
    data = load_dataset(DataConfig.model_validate(model.card["recipe"]["data"]))
    for split in ("val", "test"):
        for fold in (True, False):  # the run's BN-folded evaluation and the model as a user calls it
            acc, _ = evaluate(model, data.iterator(split, 256, seed=0), torch.device("cpu"), fold=fold)
            assert acc == model.card[f"{split}_acc"], (split, fold)


@pytest.mark.data
def test_tampered_truncated_or_misfit_weights_are_refused_in_one_line(trained, tmp_path):
    folder, _ = trained

    def copy(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(folder, d)
        return d

    flipped = copy("flipped")
    raw = bytearray((flipped / WEIGHTS).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (flipped / WEIGHTS).write_bytes(bytes(raw))
    truncated = copy("truncated")
    (truncated / WEIGHTS).write_bytes((folder / WEIGHTS).read_bytes()[:1000])
    for bad in (flipped, truncated):
        with pytest.raises(InputError) as e:
            load_model(bad)
        msg = str(e.value)
        assert "\n" not in msg and str(bad / WEIGHTS) in msg and "sha256" in msg and "tampered" in msg
    # weights of another architecture, with a card that vouches for them: they do not fit
    misfit = copy("misfit")
    other = build_model(Genotype.load(TEACHER_GENOTYPE), 6, 10, 1, 28)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(misfit / WEIGHTS))
    card = read_card(misfit)
    card["weights_sha256"] = dnad.deploy.sha256_file(misfit / WEIGHTS)
    (misfit / CARD).write_text(json.dumps(card))
    with pytest.raises(InputError, match=r"do not fit the architecture \(.*size mismatch") as e:
        load_model(misfit)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="not a dnad model folder"):
        load_model(tmp_path)


CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import onnxruntime as ort

    model, inputs, outputs = sys.argv[1:4]
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    x = np.load(inputs)
    name = sess.get_inputs()[0].name
    np.save(outputs, np.concatenate([sess.run(None, {name: x[:1]})[0], sess.run(None, {name: x[1:]})[0]]))
    assert not any(m == "dnad" or m.startswith(("dnad.", "torch")) for m in sys.modules), "imported dnad/torch"
    print("ok")
    """
)


@pytest.mark.data
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_matches_pytorch_on_real_test_images_in_a_process_without_dnad(trained, tmp_path, exporter):
    folder, cfg = trained
    model = load_model(folder)
    onnx_file = folder / ONNX  # the fixture's folder holds the default (dynamo) export
    if exporter != "dynamo":
        onnx_file = tmp_path / "other.onnx"
        assert export_onnx(model, onnx_file, exporter=exporter)["exporter"].startswith(
            f"torch.onnx ({exporter})"
        )
    data = load_dataset(cfg.data)
    x, _ = next(iter(data.iterator("test", 256, seed=0).iterate(0)))  # real images, normalised as trained
    with torch.no_grad():
        want = model(x).numpy()
    np.save(tmp_path / "x.npy", x.numpy())
    (tmp_path / "child.py").write_text(CHILD)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "child.py"), str(onnx_file), str(tmp_path / "x.npy"),
         str(tmp_path / "y.npy")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    got = np.load(tmp_path / "y.npy")  # batch 1 then batch 255: the batch axis is dynamic
    assert got.shape == want.shape == (256, 10)
    assert np.abs(got - want).max() <= 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()


def _pngs(data, tmp_path: Path, n: int) -> list[Path]:
    from PIL import Image

    paths = []
    for i in range(n):
        img = Image.fromarray(data.test.images[i, 0].numpy(), mode="L")
        if i == 1:
            img = img.convert("RGB")  # an RGB file for a grayscale model
        if i == 2:
            img = img.resize((56, 56), Image.Resampling.NEAREST)  # a larger file
        paths.append(tmp_path / f"img{i}.png")
        img.save(paths[-1])
    return paths


@pytest.mark.data
def test_predict_prints_the_top_classes_of_image_files(trained, tmp_path):
    folder, cfg = trained
    data = load_dataset(cfg.data)
    paths = _pngs(data, tmp_path, 4)
    cmd = [sys.executable, str(REPO / "pipeline/predict.py"), str(folder), *map(str, paths), "--json"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    model = load_model(folder)
    x, _ = next(iter(data.iterator("test", 4, seed=0).iterate(0)))
    with torch.no_grad():
        want = torch.softmax(model(x), 1)
    names = model.card["classes"]
    for i, row in enumerate(rows):
        probs = [t["p"] for t in row["top"]]
        assert row["image"] == str(paths[i]) and len(row["top"]) == 5 and probs == sorted(probs, reverse=True)
        # as the model sees the test image: the same pixels (an RGB copy of a grayscale image converts back
        # exactly), except the one upscaled 2x and resized back: nearly the same pixels, where a near tie
        # can flip, so that one is checked against the model's output on the file's own input
        ref = want[i]
        if i == 2:
            with torch.no_grad():
                ref = torch.softmax(model(read_image(paths[i], model.card)[None]), 1)[0]
        assert row["top"][0]["class"] == names[int(ref.argmax())]
        assert row["top"][0]["p"] == pytest.approx(float(ref.max()), abs=1e-5)
    text = subprocess.run(cmd[:-1], cwd=tmp_path, capture_output=True, text=True, timeout=300).stdout
    assert text.splitlines()[0] == str(paths[0]) and text.splitlines()[1].strip().endswith(
        rows[0]["top"][0]["class"]
    )


@pytest.mark.data
def test_predict_bad_input_is_one_line_and_exit_2(trained, tmp_path):
    folder, _ = trained
    (tmp_path / "notes.txt").write_text("not an image")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    misfit = tmp_path / "misfit"
    shutil.copytree(folder, misfit)
    (misfit / WEIGHTS).write_bytes(b"\0" * 64)
    for args, text in (
        ([str(folder), str(tmp_path / "notes.txt")], "not a readable image"),
        ([str(folder), str(tmp_path / "missing.png")], "missing.png"),
        ([str(empty), str(tmp_path / "notes.txt")], "not a dnad model folder"),
        ([str(misfit), str(tmp_path / "notes.txt")], "sha256"),
    ):
        proc = subprocess.run([sys.executable, str(REPO / "pipeline/predict.py"), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and text in proc.stderr


# -- the model folders of a pipeline run -----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.ray
def test_every_ok_architecture_of_a_run_has_its_model_folder(smoke_run):
    archs = pd.read_parquet(smoke_run / "architectures.parquet")
    ok = archs[archs["status"] == "ok"]
    assert len(ok) >= 1
    for r in ok.itertuples():
        card = read_card(smoke_run / r.model_dir)
        assert (
            card["arch_id"] == r.arch_id and card["val_acc"] == r.val_acc and card["test_acc"] == r.test_acc
        )
        assert card["latency"]["onnx_ms"]["1"] == r.latency_ms_onnx and card["params"] == r.params
        assert (smoke_run / r.model_dir / ONNX).is_file()
        load_model(smoke_run / r.model_dir)
        # the trial's worker ran on tcmalloc where this machine has it (ray.allocator=auto); make test installs it
        assert card["latency"]["malloc"] == ("tcmalloc" if find_tcmalloc() else "system")


@pytest.mark.slow
@pytest.mark.ray
def test_export_and_profile_rewrite_a_copy_of_a_run(smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    before = pd.read_parquet(run / "architectures.parquet")
    ids = list(before.loc[before["status"] == "ok", "arch_id"])
    onnx_mtime = {a: (run / "models" / a / ONNX).stat().st_mtime_ns for a in ids}
    py = sys.executable
    assert read_card(run / "models" / ids[0])["onnx"]["exporter"].startswith(
        "torch.onnx (torchscript)"
    )  # tiny
    proc = subprocess.run([py, str(REPO / "pipeline/export.py"), str(run), "--arch", ids[0], "--opset", "17",
                           "--exporter", "dynamo"], cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert read_card(run / "models" / ids[0])["onnx"]["opset"] == 17
    assert read_card(run / "models" / ids[0])["onnx"]["exporter"].startswith("torch.onnx (dynamo)")
    assert read_card(run / "models" / ids[0])["onnx"]["max_abs_diff_vs_torch"] <= 1e-4
    assert all((run / "models" / a / ONNX).stat().st_mtime_ns == onnx_mtime[a] for a in ids[1:])
    pareto = before[before[["is_pareto_macs", "is_pareto_params", "is_pareto_latency"]].any(axis=1)]
    proc = subprocess.run([py, str(REPO / "pipeline/export.py"), str(run), "--pareto"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == len(pareto), proc.stderr
    bad = subprocess.run([py, str(REPO / "pipeline/export.py"), str(run), "--arch", "nope"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--arch='nope'" in bad.stderr

    stamp = {a: read_card(run / "models" / a)["latency"]["measured_at"] for a in ids}
    (run / "report.html").unlink()
    proc = subprocess.run([py, str(REPO / "pipeline/profile.py"), str(run), "--threads", "2", "--batch", "8"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    after = pd.read_parquet(run / "architectures.parquet")
    for a in ids:
        lat = read_card(run / "models" / a)["latency"]
        assert lat["measured_at"] > stamp[a] and lat["threads"] == 2 and lat["batches"] == [1, 8]
        row = after.set_index("arch_id").loc[a]
        assert row["latency_ms_onnx"] == lat["onnx_ms"]["1"] and row["latency_threads"] == 2
        assert row["latency_batch"] == 8
    assert list(after["val_acc"]) == list(before["val_acc"])  # nothing retrained
    from dnad.results import pareto_mask

    err = after["val_error"].where(after["status"] == "ok")
    assert list(after["is_pareto_latency"]) == list(pareto_mask(err, after["latency_ms_onnx"]))
    assert (run / "report.html").is_file() and "pareto-latency" in (run / "report.html").read_text()
    assert pd.read_csv(run / "architectures.csv")["latency_ms_onnx"].tolist() == pytest.approx(
        after["latency_ms_onnx"].tolist(), nan_ok=True
    )
