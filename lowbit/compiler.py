"""compile(): lower a model, run a pass pipeline over it, and give back the same kind of model.

A torch model comes back as a torch module (an fx.GraphModule; trainable),
an ONNX model (or .onnx path) as an onnx.ModelProto. With `dump_dir`, the
PassManager writes what every pass did there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .api import codegen, lower
from .ir.graph import Graph
from .passes import DEFAULT_PIPELINE, Pass, PassContext, PassManager


def origin_target(model: Any) -> str:
    """The codegen target that gives back the kind of model the user passed."""
    if isinstance(model, (str, os.PathLike)) or type(model).__module__.split(".")[0] == "onnx":
        return "onnx"
    return "torch"


def default_pipeline(hw: Any = "CPU", dataset: Any = None) -> list[str]:
    """The passes `compile` runs when none are named."""
    return list(DEFAULT_PIPELINE)


def run_pipeline(graph: Graph, passes: Sequence[Pass | str] | None, ctx: PassContext,
                 dump_dir: str | Path | None = None) -> tuple[Graph, PassManager]:
    pm = PassManager(default_pipeline(ctx.hw, ctx.dataset) if passes is None else passes, dump_dir=dump_dir)
    return pm.run(graph, ctx), pm


def compile(model: Any, passes: Sequence[Pass | str] | None = None, *, hw: Any = "CPU", dataset: Any = None,
            example_inputs: Any = None, subset_size: int = 300, ignored_scope: Any = None,
            dump_dir: str | Path | None = None) -> Any:
    """Lower `model`, run `passes` (default: the device's pipeline), and write it back as the kind it was."""
    graph = lower(model, example_inputs)
    ctx = PassContext(hw=hw, dataset=dataset, subset_size=subset_size, ignored_scope=ignored_scope)
    graph, _ = run_pipeline(graph, passes, ctx, dump_dir)
    return codegen(graph, origin_target(model))
