"""PyTorch modules of the Spatial Transformer CNN (needs the `train` or `export` extra)."""

from edge_stn.nn.models import (
    ARCHITECTURES,
    STCNN,
    Classifier,
    ModelOutput,
    ModelSpec,
    PlainCNN,
    build_model,
    count_flops,
)
from edge_stn.nn.stn import BilinearSampler, GridGenerator, LocalizationNet, SpatialTransformer

__all__ = [
    "ARCHITECTURES",
    "STCNN",
    "BilinearSampler",
    "Classifier",
    "GridGenerator",
    "LocalizationNet",
    "ModelOutput",
    "ModelSpec",
    "PlainCNN",
    "SpatialTransformer",
    "build_model",
    "count_flops",
]
