"""Classify image files with a retrained model: the top classes and their probabilities.

    python pipeline/predict.py MODEL_DIR IMAGE [IMAGE ...] [--top K] [--json]

MODEL_DIR is a model folder of a run (`OUTPUT/models/<arch_id>/`). Each image is read as at training
time (grayscale or RGB as the model expects, centre square resized to its input size, normalised).
Bad input (not a model folder, weights that do not match it, an unreadable image): one line
`error: ...` on stderr, exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repo root replaces pipeline/ on the path, so that
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # pipeline/profile.py hides no stdlib module

from dnad.errors import InputError
from pipeline.cli import Parser, fail


def main(argv: list[str] | None = None) -> int:
    p = Parser(
        prog="pipeline/predict.py", description="Top-k classes of image files with a dnad model folder."
    )
    p.add_argument("model", metavar="MODEL_DIR", help="a model folder, OUTPUT/models/<arch_id>")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--top", type=int, default=5, help="how many classes to print per image (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image instead of text")
    args = p.parse_args(argv)
    if args.top < 1:
        return fail(InputError("--top", args.top, "must be at least 1"))
    import torch

    from dnad.deploy import load_model, read_image, top_k

    try:
        model = load_model(args.model)
        x = torch.stack([read_image(path, model.card) for path in args.images])
    except InputError as e:
        return fail(e)
    for path, best in zip(args.images, top_k(model, x, args.top)):
        if args.json:
            print(json.dumps({"image": path, "top": [{"class": c, "p": round(v, 6)} for c, v in best]}))
            continue
        print(path)
        for name, prob in best:
            print(f"  {100 * prob:6.2f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
