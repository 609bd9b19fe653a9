"""Bad input, table-driven: every case exits with code 2 before Ray starts, prints exactly one line on
stderr naming the field or path, the value and a hint, and creates or changes nothing on disk."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import pipeline.raytools
from dnad.errors import InputError
from pipeline.checks import fit_data
from pipeline.config import build_config, to_yaml
from pipeline.run import main, parse_args, resolve

REPO = Path(__file__).resolve().parent.parent
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# id, arguments ({t} = the case's scratch folder), texts the one stderr line must hold (field, value, hint)
CASES = [
    ("unknown-profile", ["--profile", "nope"], ["--profile", "'nope'", "unknown profile", "quick"]),
    ("unknown-key", ["--smoke-test", "search.foo=1"], ["search.foo=1", "unknown key", "epochs"]),
    ("wrong-type", ["--smoke-test", "search.epochs=abc"], ["search.epochs=", "'abc'", "valid integer"]),
    ("negative-lr", ["--smoke-test", "retrain.lr=-1"], ["retrain.lr=-1", "greater than 0"]),
    ("bad-override", ["--smoke-test", "search.epochs"], ["override", "'search.epochs'", "key=value"]),
    ("bad-sweep-value", ["--smoke-test", "sweep.temperature=[-1]"], ["sweep.temperature", "-1", "greater than 0"]),
    ("s-min-above-initial-S", ["--smoke-test", "search.shrink.s_min=1e9"],
     ["search.shrink.s_min=1000000000.0", "must be below", "initial S = 216.08"]),
    ("unknown-op-set", ["--smoke-test", "search.supernet.ops=foo"],
     ["search.supernet.ops='foo'", "unknown op set", "reference"]),
    ("unknown-op", ["--smoke-test", "search.supernet.ops=[sep_conv_3x3,conv_9x9]"],
     ["search.supernet.ops=", "conv_9x9", "registered ops"]),
    ("empty-op-set", ["--smoke-test", "search.supernet.ops=[]"], ["search.supernet.ops=[]", "op set is empty"]),
    ("batch-larger-than-data", ["--smoke-test", "search.batch_size=1000"],
     ["search.batch_size=1000", "larger than the 230 training images"]),
    ("missing-fashion-mnist", ["data.root={t}/nonexistent"],
     ["data.root=", "/nonexistent", "apt-get install dataset-fashion-mnist"]),
    ("imagefolder-without-classes", ["data.dataset=imagefolder", "data.root={t}/img_empty"],
     ["data.root=", "img_empty/train", "no class folders"]),
    ("imagefolder-class-without-images", ["data.dataset=imagefolder", "data.root={t}/img_noimg"],
     ["data.root=", "img_noimg/train/cat", "no readable image in this class folder"]),
    ("imagefolder-without-val", ["data.dataset=imagefolder", "data.root={t}/img_noval"],
     ["data.root=", "img_noval", "no val/"]),
    ("imagefolder-one-class", ["data.dataset=imagefolder", "data.root={t}/img_one"],
     ["data.root=", "img_one/train", "has 1 class folder (cat); a classifier needs at least two"]),
    ("imagefolder-bad-files-refused", ["data.dataset=imagefolder", "data.root={t}/img_junk", "data.bad_files=error"],
     ["data.bad_files='error'", "2 file(s) under", "img_junk/train", "cat/notes.txt: not an image", "dog/x.jpg: unreadable"]),
    ("explicit-subset-larger-than-the-data", ["--smoke-test", "data.train_subset=1000"],
     ["data.train_subset=1000", "larger than the train split once 26 validation images are held out (230 images)"]),
    ("search-workers-the-machine-cannot-hold", ["--smoke-test", "ray.num_cpus=2", "ray.workers=3", "ray.cpus_per_worker=2"],
     ["ray.workers=3", "3 search worker(s) × 2 CPU each on one node", "1 node(s) with 2 CPUs (room for 1)"]),
    ("retrain-trial-the-machine-cannot-hold", ["--smoke-test", "ray.num_cpus=2", "ray.cpus_per_trial=8"],
     ["ray.cpus_per_trial=8", "a retrain trial needs 8 CPU on one node", "1 node(s) with 2 CPUs"]),
    ("address-where-no-cluster-answers", ["--smoke-test", "--address", "127.0.0.1:9"],
     ["ray.address='127.0.0.1:9'", "no Ray cluster answers there", "ray start --head"]),
    ("allocator-not-a-path", ["--smoke-test", "ray.allocator=tcmalloc"],
     ["ray.allocator='tcmalloc'", "not an absolute path", "use auto, system or the path"]),
    ("allocator-missing", ["--smoke-test", "ray.allocator={t}/libnope.so"], ["ray.allocator=", "libnope.so'", "no such file"]),
    ("allocator-not-a-library", ["--smoke-test", "ray.allocator={t}/afile"],
     ["ray.allocator=", "afile'", "not a shared library"]),
    ("gpu-without-gpu", ["--smoke-test", "ray.use_gpu=true"], ["ray.use_gpu=True", "no CUDA GPU", "auto"]),
    ("output-under-a-file", ["--smoke-test", "--output", "{t}/afile/run"],
     ["--output=", "afile/run", "not writable"]),
    ("output-is-a-file", ["--smoke-test", "--output", "{t}/afile"], ["--output=", "afile'", "is a file"]),
    ("output-not-a-run-folder", ["--smoke-test", "--output", "{t}/notarun"],
     ["--output=", "notarun", "not a dnad run folder"]),
    ("fresh-on-a-foreign-folder", ["--smoke-test", "--fresh", "--output", "{t}/notarun"],
     ["--output=", "notarun", "not a dnad run folder"]),
    ("output-read-only", ["--smoke-test", "--output", "{t}/readonly/run"],
     ["--output=", "readonly/run", "not writable"]),
    ("teacher-cache-unwritable", ["--smoke-test", "teacher.cache_dir={t}/afile/cache"],
     ["teacher.cache_dir=", "afile/cache", "not writable"]),
    ("resume-with-changed-config", ["--smoke-test", "--output", "{t}/run", "search.epochs=3"],
     ["search.epochs=3", "differs from the run saved in", "(was 4)", "--fresh"]),
    ("same-folder-other-name", ["--smoke-test", "--output", "{t}/run", "name=other"],
     ["name='other'", "differs from the run saved in", "(was 'tiny')", "--fresh"]),
]  # fmt: skip


def scene(t: Path) -> None:
    """The scratch folder every case starts from (some cases read parts of it)."""
    from PIL import Image

    for d in ("img_empty/train", "img_empty/val", "img_noimg/train/cat", "img_noimg/val/cat", "img_noimg/train/dog",
              "img_noimg/val/dog", "img_noval/train/cat", "img_one/train/cat", "img_one/val/cat", "img_junk/train/cat",
              "img_junk/train/dog", "img_junk/val/cat", "img_junk/val/dog", "notarun", "readonly"):  # fmt: skip
        (t / d).mkdir(parents=True)
    for d in ("img_noimg/train/dog", "img_noimg/val/dog", "img_one/train/cat", "img_one/val/cat", "img_junk/train/cat",
              "img_junk/train/dog", "img_junk/val/cat", "img_junk/val/dog"):  # fmt: skip
        Image.new("RGB", (8, 8)).save(t / d / "a.png")
    (t / "img_noimg/train/cat/readme.txt").write_text("not an image")
    (t / "img_noimg/val/cat/readme.txt").write_text("not an image")
    (t / "img_noval/train/cat/a.png").write_bytes(b"\x89PNG")
    (t / "img_junk/train/cat/notes.txt").write_text("not an image")
    (t / "img_junk/train/dog/x.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (t / "afile").write_text("a file, not a folder")
    (t / "notarun/notes.txt").write_text("someone's files")
    os.chmod(t / "readonly", 0o500)
    saved, _ = fit_data(
        build_config(None, None, [f"teacher.cache_dir={t}/cache"], smoke=True), set()
    )  # a run
    (t / "run").mkdir()
    (t / "run/config.yaml").write_text(to_yaml(saved.model_copy(update={"output": str(t / "run")})))


def tree(t: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(t)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(t.rglob("*"))}


def argv(args: list[str], t: Path) -> list[str]:
    out = [a.format(t=t) for a in args]
    if "--output" not in out:
        out += ["--output", str(t / "out")]
    if not any(a.startswith("teacher.cache_dir=") for a in out):
        out.append(f"teacher.cache_dir={t}/cache")
    return out


@pytest.fixture
def no_ray(monkeypatch):
    def start_ray(*a, **k):
        raise AssertionError("Ray was started for bad input")

    monkeypatch.setattr(pipeline.raytools, "start_ray", start_ray)


@pytest.mark.parametrize(("args", "texts"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(args, texts, tmp_path, capsys, no_ray, request):
    if "gpu-without-gpu" in request.node.name and torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    if "read-only" in request.node.name and IS_ROOT:
        pytest.skip("root writes through mode 0o500 (the output-under-a-file case covers root)")
    t = tmp_path / "t"
    t.mkdir()
    scene(t)
    before = tree(t)
    code = main(argv(args, t))
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for text in texts:
        assert text.format(t=t) in lines[0], f"{text!r} not in {lines[0]!r}"
    assert out == ""
    assert tree(t) == before  # nothing created, nothing overwritten


def test_the_saved_run_resumes_unchanged_and_fresh_overrides(tmp_path, no_ray):
    """Controls for the two resume cases: the same config resumes, --fresh allows a changed one."""
    scene(tmp_path)
    same, _ = resolve(parse_args(argv(["--smoke-test", "--output", "{t}/run"], tmp_path)))
    assert same.resuming is True
    fresh, _ = resolve(
        parse_args(argv(["--smoke-test", "--fresh", "--output", "{t}/run", "search.epochs=3"], tmp_path))
    )
    assert fresh.resuming is False and fresh.cfg.search.epochs == 3


def test_a_run_saved_before_a_setting_existed_resumes(tmp_path, no_ray):
    """A key missing from an older run's config.yaml counts as its default (retrain.cuda_graph came
    later; label_smoothing stands for any other such key); a changed value still refuses."""
    scene(tmp_path)
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    del saved["retrain"]["cuda_graph"], saved["retrain"]["label_smoothing"]
    (tmp_path / "run/config.yaml").write_text(yaml.safe_dump(saved))
    assert resolve(parse_args(argv(["--smoke-test", "--output", "{t}/run"], tmp_path)))[0].resuming is True
    with pytest.raises(InputError, match=r"retrain\.epochs"):
        resolve(parse_args(argv(["--smoke-test", "--output", "{t}/run", "retrain.epochs=7"], tmp_path)))


def test_a_run_saved_by_another_checkout_resumes_with_the_same_repo_files(tmp_path, no_ray):
    """A run folder committed or copied from another clone names the repository's files (the teacher
    genotype) under that clone's path: the same repo file here resumes, another one refuses, and a
    different teacher cache (nothing a result depends on) resumes."""
    scene(tmp_path)
    teacher = ["search.distill.teacher.kind=genotype", "search.distill.teacher.C=8"]
    genotype = "search.distill.teacher.genotype=configs/teachers/darts_v2_5cells.json"
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    saved["search"]["distill"]["teacher"] |= {"kind": "genotype", "C": 8,
                                              "genotype": "/elsewhere/clone/configs/teachers/darts_v2_5cells.json"}  # fmt: skip
    (tmp_path / "run/config.yaml").write_text(yaml.safe_dump(saved))
    args = ["--smoke-test", "--output", "{t}/run", *teacher]
    moved = [*args, genotype, "teacher.cache_dir={t}/other-cache"]
    assert resolve(parse_args(argv(moved, tmp_path)))[0].resuming is True
    other = [*args, "search.distill.teacher.genotype=configs/teachers/darts_v2_8cells.json"]
    with pytest.raises(InputError, match=r"search\.distill\.teacher\.genotype"):
        resolve(parse_args(argv(other, tmp_path)))


def test_cli_bad_input_is_one_line_on_stderr(tmp_path):
    """The real command line, in a fresh interpreter: nothing else on stderr (no warnings, no usage)."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipeline/run.py"), "--smoke-test", "search.foo=1", "--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "search.foo=1: unknown key" in proc.stderr
    assert proc.stdout == "" and not out.exists()
