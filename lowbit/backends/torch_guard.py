"""Input dims a torch model was captured for, and the check that refuses any other.

When capture has to fix a model's batch (the model only runs at its example's
batch, or its forward() branches on the batch size: see torch_capture.py), the
lowered graph's inputs are static there and `graph.meta[FIXED_DIMS]` records
them with the reason. ONNX Runtime and OpenVINO refuse other sizes of a static
dim by themselves; the torch writer calls `check_input_dims` on each such input,
so the generated module refuses them too, with a named error, instead of
running code that was specialized for another batch.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputShapeError

FIXED_DIMS = "fixed_input_dims"  # graph.meta: {input name: [[axis, size], ...]}
FIXED_REASON = "fixed_input_reason"  # graph.meta: why those dims are fixed (a sentence)


def record_fixed_dims(graph: Any, reason: str) -> None:
    """Record dim 0 of every (static) batched graph input as fixed, with `reason`."""
    fixed = {v.name: [[0, int(v.shape[0])]] for v in graph.inputs
             if v.shape and isinstance(v.shape[0], int)}
    if fixed:
        graph.meta[FIXED_DIMS] = fixed
        graph.meta[FIXED_REASON] = reason


def check_input_dims(x: Any, name: str, dims: tuple, reason: str) -> Any:
    """`x` itself if each (axis, size) of `dims` holds for it; else InputShapeError naming input and reason."""
    shape = tuple(getattr(x, "shape", ()))
    for axis, size in dims:
        if len(shape) <= axis or shape[axis] != size:
            got = shape[axis] if len(shape) > axis else "nothing"
            raise InputShapeError(
                f"input {name!r} has size {got} in dim {axis} (shape {list(shape)}), but this model was captured "
                f"for size {size} there, because {reason}. Call it with {size} in dim {axis}, or lower the "
                f"original model again with example inputs of the size you will run")
    return x
