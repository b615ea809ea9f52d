"""The public entry points: `lower` a model into the IR, `codegen` the IR back out.

`lower` takes every kind of model lowbit reads and returns one `Graph`;
`codegen` writes a Graph to torch, ONNX or OpenVINO. Later layers (passes,
compile, quantize) stand on these two.
"""

from __future__ import annotations

import functools
import gc
import os
from pathlib import Path
from typing import Any

from .errors import MissingExampleInputsError, UnknownTargetError, UnsupportedModelError
from .ir.graph import Graph

TARGETS = ("torch", "onnx", "openvino")


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
def lower(model: Any, example_inputs: Any = None) -> Graph:
    """Lower a model into a lowbit Graph. The model is never modified.

    `model` may be a torch.nn.Module (captured with torch.export from
    `example_inputs`, a tensor or tuple of tensors; dim 0 is made dynamic), a
    torch.export.ExportedProgram, a torch.fx.GraphModule, an onnx.ModelProto
    or the path of an .onnx file.
    """
    if isinstance(model, (str, os.PathLike)):
        from .ir.onnx import from_onnx, load_model

        path = Path(model)
        if path.suffix.lower() != ".onnx":
            raise UnsupportedModelError(f"lowbit reads models from .onnx files, not {path.name!r}: export the "
                                        "model to ONNX, or pass the torch module itself")
        return from_onnx(load_model(path))
    kind = type(model).__module__.split(".")[0]
    if kind == "onnx" and type(model).__name__ == "ModelProto":
        from .ir.onnx import check_model, from_onnx

        check_model(model)
        return from_onnx(model)
    if kind == "torch" or _is_torch_module(model):
        return _lower_torch(model, example_inputs)
    raise UnsupportedModelError(
        f"lowbit cannot lower a {type(model).__module__}.{type(model).__name__}: pass a torch.nn.Module, "
        "torch.export.ExportedProgram, torch.fx.GraphModule, onnx.ModelProto or a path to an .onnx file")


def _is_torch_module(model: Any) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return isinstance(model, torch.nn.Module)


def _lower_torch(model: Any, example_inputs: Any) -> Graph:
    import torch
    import torch.fx

    from .ir.torch_fx import capture, example_inputs_from_placeholders, from_exported_program

    if isinstance(model, torch.export.ExportedProgram):
        return from_exported_program(model, "exported_program")
    if isinstance(model, torch.fx.GraphModule) and example_inputs is None:
        example_inputs = example_inputs_from_placeholders(model)
        if example_inputs is None:
            raise MissingExampleInputsError(
                "this fx.GraphModule carries no example values on its placeholders: pass example_inputs=(...)")
    if isinstance(model, torch.nn.Module):
        return from_exported_program(capture(model, example_inputs), type(model).__name__)
    raise UnsupportedModelError(f"lowbit cannot lower a torch {type(model).__name__}: pass an nn.Module, an "
                                "ExportedProgram or an fx.GraphModule")


@_gc_paused
def codegen(graph: Graph, target: str) -> Any:
    """Write `graph` as a model for `target`: "torch" (fx.GraphModule), "onnx" (ModelProto) or "openvino"."""
    if not isinstance(graph, Graph):
        raise UnsupportedModelError(f"codegen takes a lowbit Graph (from lowbit.lower), not {type(graph).__name__}")
    if target == "torch":
        from .ir.torch_emit import to_torch

        return to_torch(graph)
    if target == "onnx":
        from .ir.onnx import to_onnx

        return to_onnx(graph)
    if target == "openvino":
        from .ir.openvino import to_openvino

        return to_openvino(graph)
    raise UnknownTargetError(f"unknown codegen target {target!r}: choose one of {', '.join(TARGETS)}")
