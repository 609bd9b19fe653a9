"""dnad: Differentiable Neural Architecture Distillation (SNPS + knowledge distillation), pure PyTorch."""

__version__ = "0.1.0"
