"""The frontends behind one registry: which kinds of model `lower` takes, how each becomes a Graph, and which
backend gives the same kind back (`compile` writes its result with it).

    register_frontend(Frontend("tflite", accepts=..., lower=..., target="tflite", takes="a .tflite path"))

Each built-in frontend imports its framework only when it runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UnsupportedModelError
from ..ir.graph import Graph


@dataclass(frozen=True)
class Frontend:
    """`accepts(model)` says whether this frontend reads `model`; `lower(model, example_inputs, dynamic_dims)`
    gives its Graph; `target` names the backend that writes the same kind of model back; `takes` says what it
    reads, for the error that lists them."""

    name: str
    accepts: Callable[[Any], bool]
    lower: Callable[..., Any]
    target: str
    takes: str


FRONTENDS: dict[str, Frontend] = {}


def register_frontend(frontend: Frontend, *, first: bool = True) -> Frontend:
    """Add `frontend`; it is asked before those registered earlier (`first`, the default: a model kind of
    yours wins over a built-in frontend that would also accept it) or after them."""
    others = {k: v for k, v in FRONTENDS.items() if k != frontend.name}
    FRONTENDS.clear()
    FRONTENDS.update({frontend.name: frontend, **others} if first else {**others, frontend.name: frontend})
    return frontend


def frontend_for(model: Any) -> Frontend:
    """The first registered frontend that accepts `model`, or UnsupportedModelError listing what they take."""
    for frontend in FRONTENDS.values():
        if frontend.accepts(model):
            return frontend
    raise UnsupportedModelError(f"lowbit cannot lower a {type(model).__module__}.{type(model).__name__}: pass "
                                + ", ".join(f.takes for f in FRONTENDS.values()))


def graph_of(model: Any, *, fold_merged_bn: bool = True) -> Graph | None:
    """The IR behind a torch module that compile/quantize returned, with its current weights and ranges;
    None for any other module. Lowering such a module gives this graph, FakeQuantize nodes included. A BN merged
    while it trained (fold_bn="train") is folded into its Conv by its running statistics, as deployed, unless
    `fold_merged_bn` is False (the compression state keeps it, so that training resumes)."""
    graph = getattr(model, "lowbit_graph", None)
    if graph is None:
        if not hasattr(model, "modules"):  # not a torch module (an ONNX model): nothing to import torch for
            return None
        from ..backends.torch_fq import FakeQuantize

        if any(isinstance(m, FakeQuantize) for m in getattr(model, "modules", lambda: [])()):
            raise UnsupportedModelError(
                f"this {type(model).__name__} holds lowbit FakeQuantize modules but not the graph they came from "
                "(lowbit_graph): export the module lowbit.compile/quantize returned, or a copy.deepcopy of it")
        return None
    import numpy as np

    from .torch_fx import numpy_copy

    graph = graph.copy()
    names = getattr(model, "lowbit_names", {})
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    for value in graph.constants.values():
        attr = names.get(value.name)
        if attr in state:
            value.const = numpy_copy(state[attr], transpose=bool(value.meta.get("torch_transposed")))
    for node in graph:
        attr = names.get(node.name)
        if attr is not None and node.op_type == "FakeQuantize":
            fq = model.get_submodule(attr)
            low, high = (t.detach().cpu().numpy().astype(np.float32) for t in fq.ranges())  # the range in use
            for port, array in ((1, low), (2, high), (3, low), (4, high)):
                node.set_input(port, graph.add_constant(f"{node.name}_range", array))
    graph.remove_unused_constants()
    if fold_merged_bn:
        from ..backends.torch_bn_merge import rounded_merged_weights
        from ..patterns.library.bn_folding import fold_merged

        fold_merged(graph, rounded_merged_weights(model, graph))
    return graph



# -- the built-in frontends ---------------------------------------------------------------------------------


def _is_path(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike))


def _lower_onnx_file(model, example_inputs=None, dynamic_dims=None):
    from ..frontends.onnx import from_onnx, load_model

    path = Path(model)
    if path.suffix.lower() != ".onnx":
        raise UnsupportedModelError(f"lowbit reads models from .onnx files, not {path.name!r}: export the model to "
                                    "ONNX, or pass the torch module itself")
    return from_onnx(load_model(path))


def _is_onnx_model(model: Any) -> bool:
    return type(model).__module__.split(".")[0] == "onnx" and type(model).__name__ == "ModelProto"


def _lower_onnx_model(model, example_inputs=None, dynamic_dims=None):
    from ..frontends.onnx import check_model, from_onnx

    check_model(model)
    return from_onnx(model)


def _is_torch(model: Any) -> bool:
    if type(model).__module__.split(".")[0] == "torch":
        return True
    try:
        import torch
    except ImportError:
        return False
    return isinstance(model, torch.nn.Module)


def _lower_torch(model, example_inputs=None, dynamic_dims=None):
    import torch
    import torch.fx

    from ..errors import MissingExampleInputsError

    graph = graph_of(model)
    if graph is not None:
        return graph

    from ..frontends.torch_fx import capture_program, example_inputs_from_placeholders, from_exported_program

    if isinstance(model, torch.export.ExportedProgram):
        return from_exported_program(model, "exported_program")
    if isinstance(model, torch.fx.GraphModule) and example_inputs is None:
        example_inputs = example_inputs_from_placeholders(model)
        if example_inputs is None:
            raise MissingExampleInputsError(
                "this fx.GraphModule carries no example values on its placeholders: pass example_inputs=(...)")
    if isinstance(model, torch.nn.Module):
        captured = capture_program(model, example_inputs, dynamic_dims)
        return from_exported_program(captured.program, type(model).__name__, captured.fixed_batch)
    raise UnsupportedModelError(f"lowbit cannot lower a torch {type(model).__name__}: pass an nn.Module, an "
                                "ExportedProgram or an fx.GraphModule")


# asked in this order: the ONNX ones first, so that lowering an ONNX model never imports torch
register_frontend(Frontend("onnx_file", _is_path, _lower_onnx_file, "onnx", "a path to an .onnx file"), first=False)
register_frontend(Frontend("onnx", _is_onnx_model, _lower_onnx_model, "onnx", "an onnx.ModelProto"), first=False)
register_frontend(Frontend("torch", _is_torch, _lower_torch, "torch",
                           "a torch.nn.Module, torch.export.ExportedProgram or torch.fx.GraphModule"), first=False)
