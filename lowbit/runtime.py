"""Runs a graph in its origin runtime and returns the values asked for ("taps").

A torch-origin graph runs as the torch module `torch_emit` writes; an
ONNX-origin graph runs in ONNX Runtime. Either way the tapped values become
extra outputs of one model, so a batch is computed once, whatever the taps.
Results come back as the runtime gives them: numpy arrays from ONNX Runtime
(an ONNX model never imports torch), torch tensors from torch; the
statistics (`lowbit/quant/summary.py`) take both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .ir.graph import Graph, Value


class GraphRunner:
    """`runner(arrays) -> [array or tensor per tap]`; arrays are the graph inputs in order."""

    def __init__(self, graph: Graph, taps: Sequence[Value], runtime: str | None = None, streaming: bool = False):
        self.runtime = runtime or ("onnx" if graph.meta.get("origin") == "onnx" else "torch")
        inputs = [v.name for v in graph.inputs]
        self.tap_names = [v.name for v in taps]
        self.from_input = {i: inputs.index(n) for i, n in enumerate(self.tap_names) if n in inputs}
        computed = [n for i, n in enumerate(self.tap_names) if i not in self.from_input]
        tapped = graph.copy()
        by_name = {v.name: v for v in tapped.values()}
        tapped.outputs = [by_name[n] for n in dict.fromkeys(computed)]
        tapped.meta.pop("out_spec", None)
        self.order = list(dict.fromkeys(computed))
        if self.runtime == "onnx":
            import onnxruntime as ort

            from .backends.onnx import to_onnx

            options = ort.SessionOptions()
            options.log_severity_level = 3
            # ORT's workers busy-wait after each run by default, starving the statistics reduced between runs
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = ort.InferenceSession(to_onnx(tapped).SerializeToString(), options,
                                                providers=["CPUExecutionProvider"])
            self.input_names = inputs
        else:
            from .backends.torch_emit import to_torch

            self._sink = None
            self.module = to_torch(tapped, on_value=self._dispatch if streaming else None).eval()
        self.streaming = streaming and self.runtime == "torch"

    def _dispatch(self, name: str, tensor) -> None:
        self._sink(name, tensor)

    def stream(self, arrays: Sequence[np.ndarray], sink) -> None:
        """Call `sink(tap name, value)` for every tap of one batch. A torch graph built with `streaming`
        hands each tap over as soon as it is computed, so it is not kept alive to the end of the forward."""
        if not self.streaming:
            for name, t in zip(self.tap_names, self(arrays)):
                sink(name, t)
            return
        import torch

        for i, name in enumerate(self.tap_names):
            if i in self.from_input:
                sink(name, np.asarray(arrays[self.from_input[i]]))
        self._sink = sink
        try:
            with torch.no_grad():
                self.module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))
        finally:
            self._sink = None

    def __call__(self, arrays: Sequence[np.ndarray]) -> list:
        if not self.order:
            outs = []
        elif self.runtime == "onnx":
            outs = list(self.session.run(self.order, dict(zip(self.input_names, arrays))))
        else:
            import torch

            with torch.no_grad():
                result = self.module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))
            outs = list(result) if isinstance(result, (tuple, list)) else [result]
        by_name = dict(zip(self.order, outs))
        return [np.asarray(arrays[self.from_input[i]]) if i in self.from_input else by_name[n]
                for i, n in enumerate(self.tap_names)]
