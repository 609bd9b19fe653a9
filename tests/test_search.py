import pytest
import torch
from presets import tiny_data, tiny_retrain, tiny_search

from dnad.checkpoint import load_checkpoint, save_checkpoint
from dnad.config import DistillConfig
from dnad.data import load_dataset
from dnad.distill import ResNetTeacher
from dnad.network import build_model
from dnad.retrain import RetrainLoop
from dnad.strategies.snps import SearchLoop


@pytest.fixture(scope="module")
def data():
    return load_dataset(tiny_data())


@pytest.fixture(scope="module")
def emitted(data):
    """The final genotype of one short search, shared by the retraining tests."""
    from dnad.genotype import Genotype

    return Genotype.from_json(SearchLoop(tiny_search(epochs=2), data).run()[-1].genotype)


def test_search_emits_shrinking_family_with_metrics(data):
    rows = []
    loop = SearchLoop(tiny_search(), data, callback=rows.append)
    a = {id(p) for p in loop.a_opt.param_groups[0]["params"]}
    w = {id(p) for g in loop.w_opt.param_groups for p in g["params"]}
    assert a and not (a & w)  # the two optimizers never share a parameter
    emissions = loop.run()
    assert loop.done and emissions[-1].final
    assert len(emissions) >= 2
    alive = [e.alive_pairs for e in emissions]
    assert alive == sorted(alive, reverse=True) and alive[-1] < 3 * 42
    assert len({e.arch_id for e in emissions}) >= 2
    keys = {
        "step",
        "epoch",
        "loss",
        "ce",
        "kd",
        "S",
        "gamma",
        "mu",
        "alive_pairs",
        "est_macs",
        "train_acc",
        "img_per_s",
        "emitted",
    }
    assert rows and keys <= set(rows[0])
    assert sum(r["emitted"] for r in rows) == sum(not e.final for e in emissions)
    assert rows[-1]["S"] < rows[0]["S"]
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in rows])))


def test_resume_mid_epoch_reproduces_uninterrupted_run(data, tmp_path):
    cfg = tiny_search(epochs=3)
    ref = SearchLoop(cfg, data).run()

    class Kill(Exception):
        pass

    saved = {}

    def kill_at(m):
        if m["step"] == 6:
            save_checkpoint(tmp_path / "ck", loop.state_dict())
            saved["at"] = (loop.epoch, loop.batch)
            raise Kill

    loop = SearchLoop(cfg, data, callback=kill_at)
    with pytest.raises(Kill):
        loop.run()
    assert saved["at"][1] > 0  # really mid-epoch
    resumed = SearchLoop(cfg, data)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ck"))
    out = resumed.run()
    assert [(e.arch_id, e.step, e.epoch) for e in out] == [(e.arch_id, e.step, e.epoch) for e in ref]
    assert [e.S for e in out] == pytest.approx([e.S for e in ref], rel=1e-5)


def test_search_with_distillation_teacher_stays_frozen(data):
    cfg = tiny_search(epochs=2, distill=DistillConfig(enabled=True, temperature=2.0))
    teacher = ResNetTeacher("resnet18", data.num_classes, data.in_channels, data.image_size)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    rows = []
    loop = SearchLoop(cfg, data, teacher=teacher, callback=rows.append)
    loop.run()
    assert any(r["kd"] > 0 for r in rows)
    assert not loop.teacher.model.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher tensor {k} changed"


def test_weighted_sparsity_variant(data):
    loop = SearchLoop(tiny_search(shrink=tiny_search().shrink.model_copy(update={"sparsity": "macs"})), data)
    assert not torch.all(loop.net.cost_weight == 1)
    loop.run_epoch()


def test_retrain_emitted_architecture(data, emitted):
    g = emitted
    model = build_model(g, C=4, num_classes=data.num_classes, in_channels=3, image_size=16, auxiliary=True)
    recs = []
    loop = RetrainLoop(tiny_retrain(), model, data, callback=recs.append)
    final = loop.run()
    assert len(recs) == 2 and final["epoch"] == 2 and 0.0 <= final["test_acc"] <= 1.0
    assert loop.p_max > 0


@pytest.mark.parametrize(("every", "validated"), [(0, [False, False, True]), (2, [False, True, True])])
def test_retrain_validates_every_n_epochs_and_tests_only_after_the_last(data, emitted, every, validated):
    import math

    g = emitted
    model = build_model(g, C=4, num_classes=data.num_classes, in_channels=3, image_size=16)
    recs = []
    RetrainLoop(tiny_retrain(epochs=3, eval_every=every), model, data, callback=recs.append).run()
    assert [not math.isnan(r["val_acc"]) for r in recs] == validated
    assert [math.isnan(r["test_acc"]) for r in recs] == [
        True,
        True,
        False,
    ]  # the test split: once, at the end
    assert 0.0 <= recs[-1]["test_acc"] <= 1.0 and 0.0 <= recs[-1]["val_acc"] <= 1.0
    untested = RetrainLoop(tiny_retrain(epochs=1), model, data, test=False).run()
    assert math.isnan(untested["test_acc"]) and not math.isnan(untested["val_acc"])


def test_retrain_reports_progress_within_each_epoch(data, emitted):
    g = emitted
    model = build_model(g, C=4, num_classes=data.num_classes, in_channels=3, image_size=16)
    ticks, recs = [], []
    loop = RetrainLoop(
        tiny_retrain(epochs=2), model, data, callback=recs.append, progress=ticks.append, progress_every=1
    )
    loop.run()
    n = loop.train_batches.num_batches(0)
    assert n >= 2  # otherwise there is no "within" an epoch to report
    fractions = [t["progress"] for t in ticks]
    # every step but an epoch's last (the epoch record covers that one), in order, strictly inside epochs
    assert fractions == [e + (b + 1) / n for e in range(2) for b in range(n - 1)]
    assert all(0.0 <= t["train_acc"] <= 1.0 and t["img_per_s"] > 0 for t in ticks)
    assert [r["epoch"] for r in recs] == [1, 2]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_retrain_resumes_from_its_state_dict_with_either_optimizer(data, emitted, tmp_path, optimizer):
    g = emitted
    cfg = tiny_retrain(epochs=2, optimizer=optimizer, weight_decay=0.01, lr=0.01)

    def fresh():
        torch.manual_seed(0)
        return RetrainLoop(
            cfg, build_model(g, C=4, num_classes=data.num_classes, in_channels=3, image_size=16), data
        )

    whole = fresh()
    assert type(whole.opt).__name__ == {"sgd": "SGD", "adamw": "AdamW"}[optimizer]
    whole.run()
    first = fresh()
    first.run_epoch()
    save_checkpoint(tmp_path / "ck", first.state_dict())
    resumed = fresh()
    resumed.load_state_dict(load_checkpoint(tmp_path / "ck"))
    resumed.run()
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert resumed.history[-1]["test_acc"] == whole.history[-1]["test_acc"]
