"""The detector stage (DESIGN §7): proposals, batched ST-CNN windows, NMS, canonical crops.

NumPy + OpenCV; ONNX Runtime only through :class:`edge_stn.runtime.engine.Engine`. Never torch.
"""

from edge_stn.detect.crops import EncodedCrop, LazyCrop, canonical_crop, encode_jpeg
from edge_stn.detect.detector import Detector, DetectorStats, FrameWindows
from edge_stn.detect.nms import box_iou, nms
from edge_stn.detect.proposals import ProposalFinder

__all__ = [
    "Detector",
    "DetectorStats",
    "EncodedCrop",
    "FrameWindows",
    "LazyCrop",
    "ProposalFinder",
    "box_iou",
    "canonical_crop",
    "encode_jpeg",
    "nms",
]
