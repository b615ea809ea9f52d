"""The torch writer's form of a Conv whose BatchNormalization is merged while it trains (fold_bn="train") and
whose weight is quantized per tensor:

    s = bn.weight / sqrt(bn.running_var + eps)
    y = bn(conv(x, fake_quantize(W * s)) / s + b)

the simulated folding of Jacob et al. (CVPR'18) that PyTorch's ConvBn QAT modules use. The BN module stays
(under the user's path): in training it normalizes by the batch and updates its running statistics, so the
network trains as the user's did, while the weight quantizer rounds the weight that will be deployed, W scaled
by the running statistics. In eval mode it computes exactly the folded, quantized Conv that export writes
(`patterns.library.bn_folding.fold_merged`). A per-channel weight quantizer needs none of it: folding scales
its grid with the weight, exactly, so the Conv is written as it is, on the quantized W, before its BN; so is a
per-tensor one placed with per_tensor_weights="unfolded", which rounds W (NNCF's per-tensor weights).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import UnsupportedOpError
from ..ir.graph import Node
from ..ir.ops import weight_quantizer
from ..patterns.library.bn_folding import rounds_stored_weight

if TYPE_CHECKING:
    from torch import fx

aten = torch.ops.aten


def merged_conv(fq: Node) -> Node | None:
    """The Conv marked `bn_merge` whose weight quantizer `fq` rounds W * s, or None (one that rounds W itself is
    emitted as it is: patterns/library/bn_folding.py)."""
    uses = fq.output.uses
    if len(uses) == 1 and uses[0][1] == 1 and uses[0][0].op_type == "Conv" and uses[0][0].meta.get("bn_merge") \
            and not rounds_stored_weight(fq.output):
        return uses[0][0]
    return None


def simulated_folding(conv: Node) -> bool:
    """Whether `conv` is emitted in the simulated-folding form: marked `bn_merge`, its weight read through a
    per-tensor quantizer (an unquantized weight needs no folding to train: W * s / s is W)."""
    return bool(conv.meta.get("bn_merge")) and weight_quantizer(conv) is not None \
        and not rounds_stored_weight(conv.input(1))


def _bn_of(conv: Node) -> Node:
    return next(user for user, _ in conv.output.uses if user.name == conv.meta["bn_merge"])


def emit_merged_conv(e, conv: Node) -> fx.Node:
    """Emit `conv` and the scaling around it (the BN itself is emitted after, as its own module)."""
    from .torch_emit import _batch_norm_module, _conv_call

    bn = _bn_of(conv)
    path = e.merged_bn.get(bn.name) or _batch_norm_module(e, bn)
    if path is None:
        raise UnsupportedOpError(f"BatchNormalization {bn.name!r}, merged into Conv {conv.name!r}, shares its "
                                 "parameters with other nodes and cannot be written as a module: compile with "
                                 "fold_bn='eval' (BN folded before quantizing)")
    e.merged_bn[bn.name] = path
    module = e.root[path]
    for slot in ("weight", "running_var"):  # read through the BN module's path: training updates them in place
        e.root[f"{path}.{slot}"] = getattr(module, slot)
    gamma, var = e.fx.get_attr(f"{path}.weight"), e.fx.get_attr(f"{path}.running_var")
    eps = float(bn.attrs.get("epsilon", 1e-5))
    s = e.call(aten.div.Tensor, gamma, e.call(aten.sqrt.default, e.call(aten.add.Tensor, var, eps)))
    w = conv.input(1)
    rank = len(conv.output.shape) if conv.output.shape is not None else len(w.shape)
    per_filter = e.call(aten.reshape.default, s, [-1] + [1] * (rank - 1))
    per_channel = e.call(aten.reshape.default, s, [1, -1] + [1] * (rank - 2))
    fq = w.producer  # FakeQuantize(W): the quantizer rounds W * s
    weight = e.fx.call_module(e.names[fq.name], (e.call(aten.mul.Tensor, e[fq.input(0)], per_filter),))
    y = e.call(aten.div.Tensor, _conv_call(e, conv, weight, None), per_channel)
    bias = conv.input(2)
    if bias is not None:
        y = e.call(aten.add.Tensor, y, e.call(aten.reshape.default, e[bias], [1, -1] + [1] * (rank - 2)))
    return y


def rounded_merged_weights(model: torch.nn.Module, graph) -> dict:
    """The weight each merged Conv's quantizer gives in `model`'s forward, by Conv name, for `fold_merged`:
    q(W) for one that rounds W (`rounds_stored_weight`), q(W * s) for the others, with s computed as
    `emit_merged_conv` does (float32), so the integers are the module's to the last midpoint."""
    from ..patterns.library.bn_folding import merged_pairs

    names = getattr(model, "lowbit_names", {})
    rounded = {}
    for conv, bn in merged_pairs(graph):
        fq = weight_quantizer(conv)
        if fq is None or names.get(fq.name) is None:
            continue
        module = model.get_submodule(names[fq.name])
        device = next(iter(module.buffers()), torch.empty(0)).device
        w = torch.from_numpy(fq.input(0).const.copy()).to(device)
        if not rounds_stored_weight(conv.input(1)):
            gamma, var = (torch.from_numpy(bn.input(i).const.copy()).to(device) for i in (1, 4))
            s = gamma / torch.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
            w = w * s.reshape([-1] + [1] * (w.dim() - 1))
        with torch.no_grad():
            rounded[conv.name] = module(w).detach().cpu().numpy()
    return rounded
