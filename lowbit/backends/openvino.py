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
from .onnx import to_onnx


def to_openvino(graph: Graph):
    """Write a Graph as an openvino.Model."""
    import openvino as ov

    proto = to_onnx(graph, fake_quantize="openvino")
    try:
        model = ov.convert_model(io.BytesIO(proto.SerializeToString()))
    except Exception as e:  # OpenVINO raises its own GeneralFailure/OpConversionFailure
        first = str(e).strip().splitlines()
        raise UnsupportedOpError(f"OpenVINO could not convert graph {graph.name!r}: "
                                 f"{first[0] if first else type(e).__name__}") from e
    ours = {n.name for n in graph} | {v.name for v in graph.values()}
    _name_generated_ops(model, ours)
    return model


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
