"""zeroseg: a PyTorch Lightning + Hydra framework for zero-shot semantic segmentation."""

__version__ = "0.1.0"
