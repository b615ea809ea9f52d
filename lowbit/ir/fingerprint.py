"""What identifies the model a graph was made from: the fingerprint the compression state (lowbit/state.py)
saves, and checks the model `lowbit.load` is given against."""

from __future__ import annotations

import numpy as np


def fingerprint(graph) -> dict:
    """What identifies a source model: its input names and ranks, and its float weights' names, dtypes and
    shapes (a torch parameter's own name where it has one)."""
    weights = {}
    for v in graph.constants.values():
        if v.const is not None and v.const.ndim >= 1 and np.issubdtype(v.const.dtype, np.floating):
            weights[str(v.meta.get("torch_name") or v.name)] = [v.const.dtype.str, list(v.const.shape)]
    return {"inputs": [[v.name, None if v.shape is None else len(v.shape)] for v in graph.inputs],
            "weights": dict(sorted(weights.items()))}


def record_source(graph) -> None:
    """Remember the fingerprint of `graph` as its source, unless it has one (a model lowbit already compressed
    keeps its source's: a torch module in its lowbit_graph, an ONNX model in its metadata_props). compile calls
    this on the graph it lowers."""
    graph.meta.setdefault("source", fingerprint(graph))
