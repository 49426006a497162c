"""Export of a training checkpoint to one verified, TensorRT-compatible ONNX file (`export` extra).

- ``onnx_export``: the torch side (exporter choice, opset policy, atomic writes) and the driver;
- ``contract``: the model file contract of DESIGN §5, checked on the file read back;
- ``document``: the embedded ``edge_stn`` metadata document and the sidecar;
- ``fp16``: the FP16 conversion that keeps theta and the sampling grid in FP32;
- ``quantize``: the INT8 build for CPU gateways (static QDQ, geometry float), verified against
  the fp32 model on the test split;
- ``files``: the atomic write of a model and its sidecar;
- ``verify``: onnx.checker, shape inference, ONNX Runtime against PyTorch, batch consistency;
- ``trt_report``: the static TensorRT compatibility report;
- ``recipes``: the printed next steps (trtexec per TensorRT version, the daemon's config).

Importing this package imports nothing heavy; the modules above import torch and onnx.
"""
