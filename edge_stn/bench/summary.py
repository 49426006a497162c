"""Repeats and distributions, summarised the one way every section reports them (NumPy only)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

PERCENTILES = (50, 95, 99)


def spread(values: Sequence[float]) -> dict[str, Any]:
    """The repeats of one figure: median, min, max, the spread ``(max - min) / median`` and the
    values themselves (in run order). Non-finite values are kept in ``values`` but left out of
    the summary; with none left the summary fields are None."""
    vals = [float(v) for v in values]
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return {"median": None, "min": None, "max": None, "spread": None, "n": 0, "values": vals}
    med = float(np.median(finite))
    lo, hi = min(finite), max(finite)
    return {
        "median": med,
        "min": lo,
        "max": hi,
        "spread": (hi - lo) / abs(med) if med else None,
        "n": len(finite),
        "values": vals,
    }


def percentiles(samples: Sequence[float], qs: Sequence[int] = PERCENTILES) -> dict[str, Any]:
    """``p50``, ``p95``, ``p99`` (linear interpolation), ``max``, ``mean`` and the sample count;
    the figures are None without samples."""
    a = np.asarray(samples, dtype=np.float64)
    out: dict[str, Any] = {"n": int(a.size)}
    for q in qs:
        out[f"p{q}"] = float(np.percentile(a, q)) if a.size else None
    out["max"] = float(a.max()) if a.size else None
    out["mean"] = float(a.mean()) if a.size else None
    return out


def median_of(runs: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """:func:`spread` of ``run[key]`` over the runs that have it (None values skipped)."""
    return spread([float(r[key]) for r in runs if r.get(key) is not None])
