import pytest
import torch

from dnad.config import DistillConfig, TeacherConfig
from dnad.distill import (
    Distiller,
    FrozenTeacher,
    ResNetTeacher,
    load_teacher,
    logit_kd,
    make_teacher,
    save_teacher,
)
from dnad.errors import InputError
from dnad.genotype import Genotype
from dnad.supernet import SuperNet


def test_resnet_teacher_adapted_to_28px_and_frozen():
    t = ResNetTeacher("resnet18", 10, 1, 28)
    assert t.net.conv1.stride == (1, 1) and isinstance(t.net.maxpool, torch.nn.Identity)
    ft = FrozenTeacher(t)
    ft.train()
    assert not ft.model.training and all(not p.requires_grad for p in ft.parameters())
    logits, feats = ft.forward_features(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 10) and [f.shape[-1] for f in feats] == [28, 14, 7]
    assert ft.probe_channels((1, 28, 28)) == [64, 128, 256]


def test_logit_kd_zero_for_identical_and_t_squared_scaling():
    z = torch.randn(4, 10)
    assert float(logit_kd(z, z, 4.0)) == pytest.approx(0.0, abs=1e-6)
    zs, zt = torch.randn(4, 10), torch.randn(4, 10)
    p_t = torch.softmax(zt / 2, 1)
    manual = 4 * (p_t * (torch.log(p_t) - torch.log_softmax(zs / 2, 1))).sum(1).mean()
    assert float(logit_kd(zs, zt, 2.0)) == pytest.approx(float(manual), rel=1e-5)


def test_distiller_feature_loss_ratios_and_gradients():
    cfg = DistillConfig(logit_weight=0.5, temperature=2.0)
    d = Distiller([8, 16, 32], [64, 128, 256], cfg)
    s = [torch.randn(2, c, h, h, requires_grad=True) for c, h in ((8, 16), (16, 8), (32, 4))]
    t = [torch.randn(2, c, h, h) for c, h in ((64, 16), (128, 8), (256, 4))]
    kd, feat, logit = d(s, t, torch.randn(2, 5, requires_grad=True), torch.randn(2, 5))
    assert float(kd) == pytest.approx(float(feat + 0.5 * logit), rel=1e-6)
    kd.backward()
    assert all(p.grad is not None for p in d.adapters.parameters())
    assert all(not bn.affine for bn in d.teacher_bns) and all(not a[1].affine for a in d.adapters)


def test_genotype_teacher_and_checkpoint_roundtrip(tmp_path):
    g = SuperNet(C=4, num_cells=3, num_classes=5, image_size=16).export()
    g.save(tmp_path / "g.json")
    cfg = TeacherConfig(kind="genotype", genotype=str(tmp_path / "g.json"), C=4)
    model = make_teacher(cfg, 5, 3, 16)
    _, feats = model.forward_features(torch.randn(2, 3, 16, 16))
    assert len(feats) == 3
    save_teacher(
        tmp_path / "t",
        model,
        {"teacher": cfg.model_dump(), "num_classes": 5, "in_channels": 3, "image_size": 16},
    )
    again = load_teacher(tmp_path / "t")
    x = torch.randn(2, 3, 16, 16)
    model.eval(), again.eval()
    assert torch.allclose(model(x), again(x))
    assert isinstance(Genotype.load(tmp_path / "g.json"), Genotype)


def test_bad_teacher_inputs():
    with pytest.raises(InputError, match=r"distill\.teacher\.arch"):
        make_teacher(TeacherConfig(arch="vgg11"), 10, 3, 32)
    with pytest.raises(InputError, match=r"distill\.teacher\.genotype"):
        make_teacher(TeacherConfig(kind="genotype", genotype="/nonexistent.json"), 10, 3, 32)
