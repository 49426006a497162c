"""edge-stn: Spatial Transformer Networks for edge video pipelines.

Importing this package (and everything the gateway daemon uses) never imports torch.
Training, evaluation of checkpoints and export live behind the `train` and `export` extras.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
