"""The textbook formulation of the networks: what the fast paths must equal, and what the speed
benchmarks time them against. No Ray in here.

* `TextbookMixedCell`: every alive (input, op) pair through the op's own `forward`, node = Σ w·op(x),
  no shared ReLU or polyphase views, no weights folded into BN, no fused weighted sum.
* `TextbookDerivedCell`: the same for a derived cell: each kept edge's own `forward`, summed.
* `textbook(model)`: a copy of a `SuperNet` or `Network` whose cells are the textbook ones, in NCHW;
  run it inside `dnad.fastops.reference_kernels()` for plain `F.conv2d` depthwise convolutions.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dnad.fastops import BatchNorm2d
from dnad.network import DerivedCell, drop_path
from dnad.ops import is_identity
from dnad.supernet import MixedCell


class TextbookMixedCell(MixedCell):
    """A mixed cell the textbook way: every alive op's own forward, Σ w·op(state)."""

    def forward(self, s_prev, s_prev2, w, alive):  # type: ignore[override]
        states = self.inputs(s_prev, s_prev2)
        for row in self.pairs:
            states.append(sum(w[col] * self.edges[key](states[i]) for col, i, key in row if alive[col]))
        return torch.cat(states[2:], dim=1)


class TextbookDerivedCell(DerivedCell):
    """A derived cell the textbook way: each kept edge's own forward on its input state, summed."""

    def forward(self, s_prev, s_prev2):  # type: ignore[override]
        states = self.inputs(s_prev, s_prev2)
        for k, node in enumerate(self.spec):
            acc = None
            for i, op in node:
                edge = self.edges[f"{k + 2}_{i}_{op}"]
                h = edge(states[i])
                if self.training and not is_identity(edge):
                    h = drop_path(h, self.drop_prob)
                acc = h if acc is None else acc + h
            states.append(acc)
        return torch.cat(states[2:], dim=1)


# dnad's modules that are PyTorch's with another forward (the same parameters and state dict)
PYTORCH_CLASS: dict[type, type] = {BatchNorm2d: nn.BatchNorm2d}


def textbook(model: nn.Module) -> nn.Module:
    """A deep copy of `model` (a SuperNet or derived Network) with textbook cells and PyTorch's own
    `nn.BatchNorm2d`, in NCHW layout."""
    m = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    for module in m.modules():
        if type(module) in PYTORCH_CLASS:
            module.__class__ = PYTORCH_CLASS[type(module)]
    for cell in m.cells:
        if type(cell) is MixedCell:
            cell.__class__ = TextbookMixedCell
        elif type(cell) is DerivedCell:
            cell.__class__ = TextbookDerivedCell
    return m
