"""Knowledge distillation for DNAD (spec §5): frozen teachers, adapters, feature + logit KD.

Every teacher exposes `forward_features(x) -> (logits, [f1, f2, f3])` with three stage features at
the student's three tap resolutions. `FrozenTeacher` keeps it in eval mode with no gradients, even
when the surrounding code calls `.train()`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dnad.checkpoint import atomic_write_text, load_tensors_safely
from dnad.config import DistillConfig, TeacherConfig
from dnad.errors import InputError
from dnad.genotype import Genotype
from dnad.teacher import GENOTYPE_KEY

RESNETS = ("resnet18", "resnet34", "resnet50")


class ResNetTeacher(nn.Module):
    """A torchvision ResNet adapted to the input size; taps the three stages that match the student.

    It follows the student's stem (`dnad.cells.resolve_stem`): CIFAR stem (< 64 px): 3×3 stride-1
    conv, no max-pool, taps layer1..layer3 (1, 1/2, 1/4 of the input side, like the student); half stem
    (64-127 px): the same conv at stride 2 (1/2, 1/4, 1/8); ImageNet stem: the stock stem, taps
    layer2..layer4 (1/8, 1/16, 1/32).
    """

    def __init__(self, arch: str, num_classes: int, in_channels: int, image_size: int, stem: str = "auto"):
        super().__init__()
        import torchvision

        from dnad.cells import STEM_STRIDE, resolve_stem

        if arch not in RESNETS:
            raise InputError("distill.teacher.arch", arch, f"torchvision teachers supported: {list(RESNETS)}")
        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        self.stem_kind = resolve_stem(stem, image_size)
        self.small = self.stem_kind != "imagenet"
        if self.small:
            stride = STEM_STRIDE[self.stem_kind]
            net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=stride, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.net = net
        self.tap_layers = (1, 2, 3) if self.small else (2, 3, 4)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n = self.net
        h = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        feats = {}
        for i, layer in enumerate((n.layer1, n.layer2, n.layer3, n.layer4), start=1):
            h = layer(h)
            feats[i] = h
        logits = n.fc(torch.flatten(n.avgpool(h), 1))
        return logits, [feats[i] for i in self.tap_layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]


class FrozenTeacher(nn.Module):
    """Wraps a teacher: eval mode forever, no gradients, outputs detached."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        super().train(False)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.model.eval()
        return self.model.forward_features(x)

    @torch.no_grad()
    def probe_channels(self, in_shape: tuple[int, int, int]) -> list[int]:
        """Channels of the three stage features (one dummy forward)."""
        p = next(self.model.parameters())
        _, feats = self.forward_features(torch.zeros(2, *in_shape, device=p.device, dtype=p.dtype))
        return [f.shape[1] for f in feats]


def make_teacher(
    cfg: TeacherConfig,
    num_classes: int,
    in_channels: int,
    image_size: int,
    stem: str = "auto",
    genotype: Genotype | None = None,
) -> nn.Module:
    """An untrained teacher network from config ('torchvision' or 'genotype' kinds), on the student's
    `stem` so that the stage features line up. A genotype teacher is built from `genotype` when
    given, else from the file `cfg.genotype`."""
    if cfg.kind == "torchvision":
        return ResNetTeacher(cfg.arch, num_classes, in_channels, image_size, stem)
    if cfg.kind == "genotype":
        from dnad.network import build_model

        if genotype is None:
            if not cfg.genotype or not Path(cfg.genotype).is_file():
                raise InputError(
                    "distill.teacher.genotype", cfg.genotype, "give the path of a genotype JSON file"
                )
            genotype = Genotype.load(cfg.genotype)
        return build_model(genotype, cfg.C, num_classes, in_channels, image_size, stem, keep_taps=True)
    raise InputError("distill.teacher.kind", cfg.kind, "checkpoint teachers are loaded with load_teacher()")


def save_teacher(path: str | Path, model: nn.Module, spec: dict) -> None:
    """A teacher checkpoint folder: `teacher.json` (how to rebuild it) + `weights.safetensors`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / ".weights.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path / "weights.safetensors")
    atomic_write_text(path / "teacher.json", json.dumps(spec, sort_keys=True, indent=1))


def load_teacher(path: str | Path) -> nn.Module:
    """Rebuild a teacher saved by `save_teacher` (weights via safetensors: no pickle)."""
    path = Path(path)
    spec_file = path / "teacher.json"
    if not spec_file.is_file():
        raise InputError("distill.teacher.checkpoint", str(path), "expected a folder with teacher.json")
    spec = json.loads(spec_file.read_text())
    cfg = TeacherConfig(**spec["teacher"])
    carried = spec.get(GENOTYPE_KEY)  # a genotype teacher's own genotype (older folders: only its path)
    model = make_teacher(
        cfg, spec["num_classes"], spec["in_channels"], spec["image_size"], spec.get("stem", "auto"),
        None if carried is None else Genotype.from_dict(carried),
    )  # fmt: skip
    model.load_state_dict(load_tensors_safely(path / "weights.safetensors"))
    return model


def _match(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the larger feature map down to the smaller one's spatial size."""
    if s.shape[-2:] == t.shape[-2:]:
        return s, t
    if s.shape[-1] > t.shape[-1]:
        return F.adaptive_avg_pool2d(s, t.shape[-2:]), t
    return s, F.adaptive_avg_pool2d(t, s.shape[-2:])


def logit_kd(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), averaged over the batch."""
    log_p_s = F.log_softmax(student / T, dim=1)
    log_p_t = F.log_softmax(teacher / T, dim=1)
    return (T * T) * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


class Distiller(nn.Module):
    """Student-side 1×1 adapters (+ non-affine BN) and teacher-side non-affine BNs; the KD loss."""

    def __init__(self, student_channels: list[int], teacher_channels: list[int], cfg: DistillConfig):
        super().__init__()
        self.cfg = cfg
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.Conv2d(s, t, 1, bias=True), nn.BatchNorm2d(t, affine=False))
            for s, t in zip(student_channels, teacher_channels)
        )
        self.teacher_bns = nn.ModuleList(nn.BatchNorm2d(t, affine=False) for t in teacher_channels)

    def forward(
        self,
        student_feats: list[torch.Tensor],
        teacher_feats: list[torch.Tensor],
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (L_KD, L_feat, L_logit) with L_KD = L_feat + β·L_logit."""
        l_feat = student_logits.new_zeros(())
        for r, adapter, bn, s, t in zip(
            self.cfg.feature_ratios, self.adapters, self.teacher_bns, student_feats, teacher_feats
        ):
            s, t = _match(adapter(s), t)
            l_feat = l_feat + r * F.mse_loss(s, bn(t))
        if self.cfg.logit_weight > 0:
            l_logit = logit_kd(student_logits, teacher_logits, self.cfg.temperature)
        else:
            l_logit = student_logits.new_zeros(())
        return l_feat + self.cfg.logit_weight * l_logit, l_feat, l_logit
