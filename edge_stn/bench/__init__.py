"""``edge-stn bench``: how fast the gateway is, measured against what bounds it.

Sections: the model on ONNX Runtime against PyTorch eager (:mod:`.model`), the daemon on H.264
files against decoding alone (:mod:`.pipeline`), end-to-end latency and scaling of wall-clock
cameras (:mod:`.live`), and the daemon's memory, CPU and start-up (:mod:`.targets`). The daemon
runs as ``edge-stn run`` in its own process against a private mosquitto (:mod:`.daemon_run`).
Outputs: JSON, a Markdown page (docs/benchmarks.md) and a PNG plot (:mod:`.report`).

Torch is imported only by the model section, and only when installed.
"""

from edge_stn.bench.suite import SECTIONS, BenchOptions, run_bench

__all__ = ["SECTIONS", "BenchOptions", "run_bench"]
