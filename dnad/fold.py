"""Inference copies of a network with every eval-mode BatchNorm folded into the convolution before it.

In eval mode a BN is a per-channel affine map, `(y - mean) / sqrt(var + eps) * w + b`, so a conv
followed by a BN is one conv with rescaled weights and a bias: the copy computes the same logits
(to float rounding) with one pass over each map fewer. On this project's 2-core CPU BN was a fifth of
an eval forward of the `quick` family's densest network (`benchmarks/eval_speed.py`). Used by
`dnad.retrain.evaluate`; the trained model itself is never changed (its weights, BN statistics and
what `dnad.deploy` saves stay as they are). No Ray in here.

Folded: an `nn.Conv2d` directly followed by an `nn.BatchNorm2d` inside an `nn.Sequential` (stems,
ReLU-conv-BN preprocessing, the dilated/separable convs' 1×1 conv + BN, the pool ops' channel
change), and `FactorizedReduce` (two convs whose concatenation one BN normalises). A BN without
running statistics (it normalises with the batch's even in eval mode) is left as it is.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from dnad.fastops import BatchNorm2d
from dnad.ops import FactorizedReduce


def _foldable(bn: nn.Module) -> bool:
    return (
        type(bn) in (nn.BatchNorm2d, BatchNorm2d)
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.running_var is not None
    )


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d, channels: slice | None = None) -> None:
    """Rescale `conv` in place by the BN's channels `channels` (all when None) and give it the bias
    (the product keeps the weight's memory layout)."""
    sl = channels or slice(None)
    w = None if bn.weight is None else bn.weight.detach()[sl]
    b = None if bn.bias is None else bn.bias.detach()[sl]
    conv_b = None if conv.bias is None else conv.bias.detach()
    conv.weight, conv.bias = fuse_conv_bn_weights(
        conv.weight.detach(), conv_b, bn.running_mean[sl], bn.running_var[sl], bn.eps, w, b
    )


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` in which every foldable conv -> BN pair is one conv with a bias
    (the BN replaced by `nn.Identity`); `model` is left untouched. Returns the copy; its parameters do
    not require grad (it is for inference)."""
    folded = copy.deepcopy(model).eval()
    with torch.no_grad():
        for module in folded.modules():
            if isinstance(module, nn.Sequential):
                names = list(module._modules)
                for a, b in itertools.pairwise(names):
                    conv, bn = module._modules[a], module._modules[b]
                    if type(conv) is nn.Conv2d and _foldable(bn) and conv.out_channels == bn.num_features:
                        _fold_into(conv, bn)
                        module._modules[b] = nn.Identity()
            elif isinstance(module, FactorizedReduce) and _foldable(module.bn):
                half = module.conv_1.out_channels
                _fold_into(module.conv_1, module.bn, slice(0, half))
                _fold_into(module.conv_2, module.bn, slice(half, None))
                module.bn = nn.Identity()
    return folded.requires_grad_(False)


def count_batchnorms(model: nn.Module) -> int:
    """How many BatchNorm layers `model` holds (a folded copy keeps only those it could not fold)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
