"""First-order Taylor importance from data (Molchanov et al.; DepGraph's TaylorImportance): the saliency of a
weight is |w * dL/dw|, summed over the calibration data, and a channel's importance is the sum over its slice
of every weight that makes or reads it.

The data carries no labels, so L is the output energy 0.5 * sum(y^2) of the
model's float outputs: a channel scores by how much removing it would change
what the model computes, to first order. The gradients are taken in torch on
the module the torch writer makes of the graph (for an ONNX model too), in
eval mode; the graph itself is not changed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import PruneError
from ..ir.graph import Graph


def taylor_saliency(graph: Graph, dataset: Any, subset_size: int = 300) -> dict[str, np.ndarray]:
    """{constant name: |w * dL/dw| summed over the data} for every float constant the model trains."""
    if dataset is None:
        raise PruneError("criterion 'taylor' needs data to take gradients on: pass dataset=lowbit.Dataset(...) "
                         "(a few hundred inputs), or use criterion 'l2'")
    import torch

    from ..backends.torch_emit import to_torch
    from ..quant.dataset import batches

    module = to_torch(graph).eval()
    params = dict(module.named_parameters())
    names = {v: a for v, a in module.lowbit_names.items() if a in params}
    for p in params.values():
        p.grad = None
    seen = 0
    for arrays in batches(graph, dataset, subset_size):
        outputs = module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))
        outputs = outputs if isinstance(outputs, (tuple, list)) else [outputs]
        loss = sum(0.5 * o.float().square().sum() for o in outputs if torch.is_tensor(o) and o.is_floating_point())
        loss.backward()
        seen += 1
    if not seen:
        raise PruneError("criterion 'taylor' got an empty dataset: pass at least one input")
    saliency = {}
    for value_name, attr in names.items():
        p = params[attr]
        if p.grad is None:
            continue
        s = (p.detach() * p.grad).abs().numpy().astype(np.float64)
        value = graph.constants.get(value_name)
        saliency[value_name] = s.T if value is not None and value.meta.get("torch_transposed") else s
    return saliency
