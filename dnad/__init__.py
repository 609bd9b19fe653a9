"""dnad: Differentiable Neural Architecture Distillation (SNPS + knowledge distillation), pure PyTorch.

`dnad.load_model(folder)` loads a retrained model folder (`OUTPUT/models/<arch_id>/`, see `dnad.deploy`).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]


def __getattr__(name: str) -> Any:  # lazy: `import dnad.config` must not pay for torch
    if name == "load_model":
        from dnad.deploy import load_model

        return load_model
    raise AttributeError(f"module 'dnad' has no attribute {name!r}")
