"""Export the retrained models of a run to ONNX: `model.onnx` next to each model's weights.

    python pipeline/export.py OUTPUT [--arch ID ...] [--pareto] [--opset N]

Every model folder of OUTPUT (`OUTPUT/models/<arch_id>/`), or only the given arch ids, or only the
architectures on a Pareto front (`--pareto`). The export has a dynamic batch axis (input "input":
(N, C, H, W) float32, normalised as `model.json` says; output "logits": (N, classes)); its opset and
sha256 are recorded in `model.json`, and each export is checked against PyTorch on a random batch.
Bad input: one line `error: ...` on stderr, exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repo root replaces pipeline/ on the path, so that
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # pipeline/profile.py hides no stdlib module

from dnad.errors import InputError
from pipeline.cli import Parser, fail


def select_models(output: str, arch_ids: list[str] | None, pareto: bool) -> dict[str, Path]:
    """`{arch_id: model folder}` picked from a run folder; InputError naming what is missing."""
    from dnad.deploy import model_folders
    from dnad.report import PARETO_FLAGS, check_run_folder
    from dnad.results import rebuild_architectures

    out = check_run_folder(output)
    folders = model_folders(out)
    if not folders:
        raise InputError(
            "OUTPUT", output, "holds no model folder (models/<arch_id>/); has retraining finished?"
        )
    if arch_ids:
        unknown = [a for a in arch_ids if a not in folders]
        if unknown:
            raise InputError(
                "--arch", unknown[0], f"no such model in {out / 'models'}; have: {', '.join(folders)}"
            )
        folders = {a: folders[a] for a in arch_ids}
    if pareto:
        archs = rebuild_architectures(out)
        on = archs[[f for f in PARETO_FLAGS if f in archs]].fillna(False).astype(bool).any(axis=1)
        keep = set(archs.loc[on, "arch_id"].astype(str))
        folders = {a: f for a, f in folders.items() if a in keep}
    return folders


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="pipeline/export.py", description="Export a run's retrained models to ONNX.")
    p.add_argument("output", metavar="OUTPUT", help="the run's output folder")
    p.add_argument("--arch", nargs="+", metavar="ID", help="only these architecture ids")
    p.add_argument("--pareto", action="store_true", help="only the architectures on a Pareto front")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the run's deploy.opset)")
    p.add_argument("--exporter", default=None, metavar="NAME",
                   help="torch.onnx exporter, dynamo or torchscript (default: the run's deploy.exporter)")  # fmt: skip
    args = p.parse_args(argv)
    from dnad.config import EXPORTERS, ONNX_OPSETS
    from pipeline.models import run_config

    try:
        if args.exporter is not None and args.exporter not in EXPORTERS:
            raise InputError("--exporter", args.exporter, f"one of {', '.join(EXPORTERS)}")
        folders = select_models(args.output, args.arch, args.pareto)
        deploy = run_config(args.output).deploy
        opset, exporter = args.opset or deploy.opset, args.exporter or deploy.exporter
        if not ONNX_OPSETS[0] <= opset <= ONNX_OPSETS[1]:
            raise InputError("--opset", opset, "this exporter writes opsets {}..{}".format(*ONNX_OPSETS))
    except InputError as e:
        return fail(e)
    from dnad.deploy import ONNX, export_onnx, load_model, write_card

    for folder in folders.values():
        try:
            model = load_model(folder)
        except InputError as e:
            return fail(e)
        info = export_onnx(model, folder / ONNX, opset, exporter)
        info["max_abs_diff_vs_torch"] = check_onnx(model, folder / ONNX)
        card = model.card
        card["onnx"] = info
        write_card(folder, card)
        print(
            f"{folder / ONNX}  ({exporter}, opset {opset}, max |onnx - torch| = {info['max_abs_diff_vs_torch']:.2e})"
        )
    return 0


def check_onnx(model, path: Path, batch: int = 4) -> float:
    """max |ONNX Runtime logits − PyTorch logits| on one random batch."""
    import numpy as np
    import torch

    from dnad.latency import onnx_session

    x = torch.randn(batch, model.in_channels, model.image_size, model.image_size)
    with torch.no_grad():
        want = model(x).numpy()
    sess = onnx_session(path, threads=1)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(got - want).max())


if __name__ == "__main__":
    sys.exit(main())
