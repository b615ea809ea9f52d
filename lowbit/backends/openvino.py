"""The OpenVINO writer: Graph -> openvino.Model, and .xml/.bin files.

The graph is written as ONNX first (`onnx.py`) and read by OpenVINO's own
ONNX frontend, which keeps symbolic dims dynamic and reads lowbit's
FakeQuantize (written in OpenVINO's `org.openvinotoolkit` ONNX domain) as
OpenVINO FakeQuantize ops; then `openvino.save_model` writes the IR.
"""

from __future__ import annotations

import io
import os
import re

from ..errors import UnsupportedOpError
from ..ir.graph import Graph
from ..ir.ops import is_fake_quantize
from .onnx import to_onnx


def to_openvino(graph: Graph):
    """Write a Graph as an openvino.Model."""
    import openvino as ov

    proto = to_onnx(weights_rounded_as_simulated(graph), fake_quantize="openvino")
    try:
        model = ov.convert_model(io.BytesIO(proto.SerializeToString()))
    except Exception as e:  # OpenVINO raises its own GeneralFailure/OpConversionFailure
        raise UnsupportedOpError(f"OpenVINO could not convert graph {graph.name!r}: {_conversion_failure(e)}") from e
    ours = {n.name for n in graph} | {v.name for v in graph.values()}
    _name_generated_ops(model, ours)
    return model


def _conversion_failure(e: Exception, limit: int = 600) -> str:
    """What OpenVINO's conversion error says about the ops that failed (its first line only names the C++ check
    that threw: "Check 'false' failed at .../unconverted_ops_report.cpp")."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    marker = next((i for i, line in enumerate(lines) if "Failed operations detailed log" in line), None)
    if marker is None:
        return lines[0] if lines else type(e).__name__
    detail = [line for line in lines[marker + 1:] if not line.startswith("Summary")]
    text = " ".join(detail)
    return text if len(text) <= limit else text[:limit] + " ..."


def weights_rounded_as_simulated(graph: Graph) -> Graph:
    """`graph`, or a copy in which each constant weight quantized on a signed grid is stored already rounded, as
    the simulation rounds it (qdq.quantize_array), behind a FakeQuantize of the same step.

    - OpenVINO rounds a float weight behind a FakeQuantize with its own arithmetic: a weight a rounding error
      from halfway between two levels (one in a few thousand) took the other level, and an EfficientNet's .xml
      agreed with its simulation at 55 dB where its .onnx (integers written by lowbit) did at 132. A weight on
      a level stays there.
    - A grid of fewer than 8 bits (4-bit weights: [-7, 7] or [-8, 7] steps) becomes a 255-level FakeQuantize of
      the same step: the same values, in the form OpenVINO's low-precision transformations run as INT8 (they
      take only 255/256-level weight FakeQuantizes; a 16-level one ran the Convolution in bf16 from decompressed
      weights)."""
    import numpy as np

    from .qdq import qdq_params, quantize_array

    grids = {}  # FakeQuantize name -> its grid's scale and zero point
    for n in graph:
        if is_fake_quantize(n) and all(v is not None and v.const is not None for v in n.inputs[:5]):
            p = qdq_params(int(n.attrs["levels"]), n.input(1).const, n.input(2).const)
            if p.zero_point.dtype == np.int8:
                grids[n.name] = p
    if not grids:
        return graph
    graph = graph.copy()
    for n in [n for n in graph if n.name in grids]:
        p, w, levels = grids[n.name], n.input(0).const, int(n.attrs["levels"])
        shape = [1] * w.ndim
        if p.axis is not None:
            shape[p.axis] = -1
        step = p.scale.astype(np.float64).reshape(shape)
        on_grid = quantize_array(w, p, levels) * step
        n.set_input(0, graph.add_constant(f"{n.name}_rounded", on_grid.astype(w.dtype)))
        if levels < 255:
            ends = [(e * step).astype(np.float32) for e in (-127, 127)]
            for port, end in ((1, ends[0]), (2, ends[1]), (3, ends[0]), (4, ends[1])):
                n.set_input(port, graph.add_constant(f"{n.name}_int8_range", end))
            n.attrs["levels"] = 255
    graph.remove_unused_constants()
    return graph


def _name_generated_ops(model, ours: set[str]) -> None:
    """Name the ops OpenVINO made up (`Constant_3502`, `Reshape_4195`: a process-wide counter) by their place
    in the model, so that the same graph gives the same .xml whenever and wherever it is written."""
    for index, op in enumerate(model.get_ordered_ops()):
        name = op.get_friendly_name()
        if name not in ours and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*_\d+", name):
            op.set_friendly_name(f"{op.get_type_name()}_{index}")


def save_openvino(graph: Graph, path: str | os.PathLike, *, compress_to_fp16: bool = False) -> None:
    """Write `path` (.xml) and its .bin beside it."""
    import openvino as ov

    ov.save_model(to_openvino(graph), str(path), compress_to_fp16=compress_to_fp16)
