"""The gateway's ONNX Runtime side: the model file contract (``metadata``), providers, engine.

Nothing here imports torch; ONNX Runtime itself is imported only where a session is made, so
``import edge_stn.runtime`` works on a machine without it.
"""
