"""The public entry points: `lower` a model into the IR, `codegen` the IR back out.

`lower` takes every kind of model lowbit reads and returns one `Graph`;
`codegen` writes a Graph to torch, ONNX or OpenVINO. Later layers (passes,
compile, quantize) stand on these two.
"""

from __future__ import annotations

import functools
import gc
from typing import Any

from .errors import UnsupportedModelError
from .frontends import graph_of  # noqa: F401  (re-exported: lowbit.api.graph_of)
from .ir.graph import Graph



def _gc_paused(fn):
    """Run `fn` with Python's cyclic garbage collector paused.

    Building a graph allocates many objects that all stay alive, and each
    full collection rescans the whole heap (torch's captured program
    included): at 22k nodes that made lowering 1.7x slower than with the
    collector paused (1.46 s vs 0.85 s, bench/ir_scale.py at 1024 layers), so
    time per node grew with graph size. Nothing here needs cycles collected.
    """

    @functools.wraps(fn)
    def paused(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return paused


@_gc_paused
def lower(model: Any, example_inputs: Any = None, *, dynamic_dims: Any = None) -> Graph:
    """Lower a model into a lowbit Graph. The model is never modified.

    `model` may be a torch.nn.Module (captured with torch.export from
    `example_inputs`, a tensor or tuple of tensors; dim 0 is made dynamic), a
    torch.export.ExportedProgram, a torch.fx.GraphModule, an onnx.ModelProto
    or the path of an .onnx file. `dynamic_dims`, one collection of axes per
    example input, names further dims a torch module is captured with as
    dynamic (a sentence length): quantize passes the dims its calibration
    items differ in.
    """
    from .frontends import frontend_for

    return frontend_for(model).lower(model, example_inputs, dynamic_dims)


@_gc_paused
def codegen(graph: Graph, target: str) -> Any:
    """Write `graph` as a model for `target`: "torch" (fx.GraphModule), "onnx" (ModelProto) or "openvino"."""
    from .backends import backend

    if not isinstance(graph, Graph):
        raise UnsupportedModelError(f"codegen takes a lowbit Graph (from lowbit.lower), not {type(graph).__name__}")
    return backend(target).build(graph)
