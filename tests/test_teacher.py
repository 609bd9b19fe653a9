"""dnad.teacher: the teacher's recipe and cache key, in the library (no Ray)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dnad.config import DataConfig, TeacherConfig
from dnad.errors import InputError
from dnad.teacher import teacher_card, teacher_hash, teacher_recipe, teacher_val_acc

REPO = Path(__file__).resolve().parents[1]
GENOTYPE = REPO / "configs" / "teachers" / "darts_v2_5cells.json"


def _genotype_teacher(path: Path, **kw) -> TeacherConfig:
    return TeacherConfig(kind="genotype", genotype=str(path), C=12, epochs=1, **kw)


def test_key_follows_the_genotype_not_its_path(tmp_path):
    data = DataConfig(dataset="fashion_mnist")
    moved = tmp_path / "elsewhere" / "teacher.json"
    moved.parent.mkdir()
    shutil.copy(GENOTYPE, moved)
    key = teacher_hash(_genotype_teacher(GENOTYPE), data, 16000, "auto")
    assert len(key) == 16
    # the same genotype from another checkout: the same key (a resumed run finds its teacher)
    assert teacher_hash(_genotype_teacher(moved), data, 16000, "auto") == key
    # a different genotype at the same path: another key
    other = json.loads(GENOTYPE.read_text())
    other["cells"][0][0][0][1] = "dil_conv_5x5"  # the first edge of the first cell
    moved.write_text(json.dumps(other))
    assert teacher_hash(_genotype_teacher(moved), data, 16000, "auto") != key
    # and everything else that changes the weights changes it too
    assert teacher_hash(_genotype_teacher(GENOTYPE), data, 8000, "auto") != key
    assert teacher_hash(_genotype_teacher(GENOTYPE, lr=0.1), data, 16000, "auto") != key
    assert teacher_hash(_genotype_teacher(GENOTYPE), data, 16000, "cifar") != key
    assert teacher_hash(_genotype_teacher(GENOTYPE), data, 16000, "auto", max_steps_per_epoch=5) != key
    assert (
        teacher_hash(_genotype_teacher(GENOTYPE), data.model_copy(update={"augment": False}), 16000, "auto")
        != key
    )
    # but not what only says where things are cached or how much is tested
    assert (
        teacher_hash(_genotype_teacher(GENOTYPE), data.model_copy(update={"test_subset": 100}), 16000, "auto")
        == key
    )


def test_recipe_stretches_epochs_to_min_steps():
    t = TeacherConfig(kind="torchvision", epochs=1, min_steps=250, batch_size=64, lr=0.05)
    assert teacher_recipe(t, 16000, seed=0).epochs == 1  # 250 steps per epoch already
    r = teacher_recipe(t, 2000, seed=3)  # 31 steps per epoch: 9 epochs reach 250 steps
    assert (r.epochs, r.min_steps, r.seed, r.batch_size, r.lr) == (9, 0, 3, 64, 0.05)
    assert teacher_recipe(t, 2000, seed=0, max_steps_per_epoch=10).epochs == 25


def test_card_and_recorded_accuracy(tmp_path):
    t = _genotype_teacher(GENOTYPE)
    card = teacher_card(t, 10, 1, 28, "auto", 0.8695, "abc")
    assert card["val_acc"] == 0.8695 and card["config_hash"] == "abc" and card["teacher"]["C"] == 12
    assert teacher_val_acc(tmp_path) is None  # no teacher.json
    (tmp_path / "teacher.json").write_text(json.dumps(card))
    assert teacher_val_acc(tmp_path) == 0.8695
    (tmp_path / "teacher.json").write_text("{cut")
    assert teacher_val_acc(tmp_path) is None


def test_library_module_imports_no_ray():
    code = "import sys, dnad.teacher; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def _saved_teacher(tmp_path: Path, card: dict) -> tuple[Path, Any]:
    import torch

    from dnad.distill import make_teacher, save_teacher

    t = TeacherConfig(**card["teacher"])
    torch.manual_seed(0)
    model = make_teacher(t, 10, 1, 28, "auto")
    save_teacher(tmp_path / "cache" / "key", model, card)
    return tmp_path / "cache" / "key", model.eval()


def test_a_genotype_teacher_folder_outlives_its_genotype_file(tmp_path):
    """A cached genotype teacher rebuilds from its own folder after the genotype file it was made from
    has moved (another checkout): the folder carries the genotype."""
    import torch

    from dnad.distill import load_teacher

    moved = tmp_path / "checkout" / "g.json"
    moved.parent.mkdir()
    shutil.copy(GENOTYPE, moved)
    card = teacher_card(_genotype_teacher(moved), 10, 1, 28, "auto", None, "key")
    assert card["teacher_genotype"] == json.loads(GENOTYPE.read_text())
    folder, model = _saved_teacher(tmp_path, card)
    shutil.rmtree(moved.parent)
    again = load_teacher(folder).eval()
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), again(x))
    # other kinds carry nothing
    assert "teacher_genotype" not in teacher_card(TeacherConfig(), 10, 1, 28, "auto", None, "key")


def test_an_older_cached_teacher_gets_the_genotype_of_the_config_that_found_it(tmp_path):
    """A folder cached before teachers carried their genotype names a file that may be gone; the run
    that finds it (by a key made from the same genotype's content) adds its own copy, and the folder
    loads after the file has moved."""
    import torch

    from dnad.distill import load_teacher
    from pipeline.teacher import carry_genotype

    gone = tmp_path / "old-checkout" / "g.json"
    card = teacher_card(_genotype_teacher(GENOTYPE), 10, 1, 28, "auto", 0.86, "key")
    del card["teacher_genotype"]
    card["teacher"]["genotype"] = str(gone)  # as a cache entry of an earlier version left it
    folder, model = _saved_teacher(
        tmp_path, {**card, "teacher": {**card["teacher"], "genotype": str(GENOTYPE)}}
    )
    (folder / "teacher.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match=r"distill\.teacher\.genotype"):
        load_teacher(folder)
    carry_genotype(folder, _genotype_teacher(GENOTYPE))
    spec = json.loads((folder / "teacher.json").read_text())
    assert spec["teacher_genotype"] == json.loads(GENOTYPE.read_text()) and spec["val_acc"] == 0.86
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), load_teacher(folder).eval()(x))
    carry_genotype(folder, TeacherConfig())  # a torchvision teacher's config changes nothing
    assert json.loads((folder / "teacher.json").read_text()) == spec
    (folder / "teacher.json").write_text("{cut")  # unreadable: left as it is, for loading to report
    carry_genotype(folder, _genotype_teacher(GENOTYPE))
    assert (folder / "teacher.json").read_text() == "{cut"
