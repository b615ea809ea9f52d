"""Quantizer placement: NNCF's published counts, where each quantizer sits, unified scales, integer edges,
presets, model types and ignored scopes."""

import collections
import math
import re

import numpy as np
import onnx
import pytest
import torch
from deploy_checks import activation_quantizers, repeated_quantizers
from models import REFERENCE_MODELS, mobilenet_v2, resnet18
from op_models import OP_MODELS

import lowbit
from lowbit.compiler import graph_of
from lowbit.hw_configs import load_hw_config
from lowbit.backends.torch_fq import FakeQuantize
from lowbit.passes import PassContext, PassManager
from lowbit.quant.placement import place_quantizers
from lowbit.quant.scope import IgnoredScope, Subgraph

FUSE = ["cleanup", "fold_bn", "fuse"]
PTQ = [*FUSE, "quantize"]

# NNCF's figures for torchvision's models on CPU: (weight, activation) quantizers
NNCF_COUNTS = {"resnet18": (21, 30), "mobilenet_v2": (53, 64)}
FACTORIES = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}


def _model(name):
    torch.manual_seed(0)
    return FACTORIES[name](num_classes=1000).eval()


def _fused(model, *inputs):
    return PassManager(FUSE).run(lowbit.lower(model, inputs))


def _random_dataset(shape, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lowbit.Dataset([torch.randn(*shape, generator=g) for _ in range(n)])


def _fq_nodes(graph):
    return [n for n in graph if n.op_type == "FakeQuantize"]


def _fq_modules(module):
    return [m for m in module.modules() if isinstance(m, FakeQuantize)]


def _quantize_pass(graph, dataset, **ctx):
    """Run only the `quantize` pass on an already fused graph (no re-lowering: fast)."""
    options = {"progress": False, **ctx.pop("options", {})}
    return PassManager(["quantize"]).run(graph, PassContext(dataset=dataset, options=options, **ctx))


def _fed_by_fq(value):
    return value.producer is not None and value.producer.op_type == "FakeQuantize"


# --------------------------------------------------------------------------- NNCF's counts


@pytest.fixture(scope="module")
def fused():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _fused(_model(name), torch.randn(1, 3, 32, 32))
        return cache[name]
    return get


@pytest.mark.parametrize("name", list(NNCF_COUNTS))
def test_placement_matches_nncf_counts(fused, name):
    points = place_quantizers(fused(name), load_hw_config("CPU"))
    weights, activations = NNCF_COUNTS[name]
    kinds = collections.Counter(p.kind for p in points)
    assert (kinds["weight"], kinds["activation"]) == (weights, activations)
    assert len(points) == weights + activations
    # one quantizer per value: merged at branches, never duplicated
    assert len({id(p.value) for p in points}) == len(points)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_placement_counts_independent_of_input_size(name):
    graph = _fused(_model(name), torch.randn(1, 3, 64, 64))
    points = place_quantizers(graph, load_hw_config("CPU"))
    assert len(points) == sum(NNCF_COUNTS[name])


@pytest.fixture(scope="module")
def compiled_resnet():
    return lowbit.compile(_model("resnet18"), PTQ, dataset=_random_dataset((1, 3, 32, 32)),
                          example_inputs=(torch.randn(1, 3, 32, 32),), overflow_fix="disable", progress=False)


@pytest.fixture(scope="module")
def compiled_mobilenet():
    return lowbit.compile(_model("mobilenet_v2"), PTQ, dataset=_random_dataset((1, 3, 32, 32)),
                          example_inputs=(torch.randn(1, 3, 32, 32),), overflow_fix="disable", progress=False)


def test_compiled_resnet18_has_51_fake_quantize_modules(compiled_resnet):
    assert isinstance(compiled_resnet, torch.nn.Module)
    fqs = _fq_modules(compiled_resnet)
    assert len(fqs) == 51
    assert sum(m.low.dim() > 0 for m in fqs) == 21  # weights: per channel
    assert sum(m.low.dim() == 0 for m in fqs) == 30  # activations: per tensor
    assert len(_fq_nodes(graph_of(compiled_resnet))) == 51


def test_compiled_mobilenet_v2_has_117_fake_quantize_modules(compiled_mobilenet):
    fqs = _fq_modules(compiled_mobilenet)
    assert len(fqs) == 117
    assert sum(m.low.dim() > 0 for m in fqs) == 53
    assert sum(m.low.dim() == 0 for m in fqs) == 64


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_exported_onnx_qdq_counts(request, tmp_path, name):
    q = request.getfixturevalue("compiled_resnet" if name == "resnet18" else "compiled_mobilenet")
    path = lowbit.export(q, tmp_path / f"{name}.onnx")
    model = onnx.load(str(path))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    weights, activations = NNCF_COUNTS[name]
    # activations: QuantizeLinear -> DequantizeLinear; weights: integer initializer -> DequantizeLinear; a layer
    # read through MaxPool/Flatten gets its own Q -> DQ on the quantizer's grid (ONNX Runtime fuses only that)
    repeats = repeated_quantizers(model)
    assert activation_quantizers(model) == activations
    assert len(repeats) == {"resnet18": 2, "mobilenet_v2": 1}[name]  # stem MaxPool -> conv; Flatten -> Gemm
    consumers = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert all(consumers[q.output[0]].output[0] in {i for n in model.graph.node if n.op_type in ("Conv", "Gemm")
                                                    for i in n.input} for q in repeats)
    assert ops["QuantizeLinear"] == activations + len(repeats)
    assert ops["DequantizeLinear"] == weights + activations + len(repeats)
    inits = {i.name: i for i in model.graph.initializer}
    dq_of_init = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(dq_of_init) == weights
    assert all(inits[n.input[0]].data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8) for n in dq_of_init)
    producers = {out: n for n in model.graph.node for out in n.output}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert producers[node.input[1]].op_type == "DequantizeLinear", node.name  # no float weight is left


# --------------------------------------------------------------------------- positions (ResNet18)


def test_stem_quantizer_moves_up_through_maxpool(compiled_resnet):
    graph = graph_of(compiled_resnet)
    pools = [n for n in graph if n.op_type == "MaxPool"]
    assert len(pools) == 1
    pool = pools[0]
    fq = pool.input(0).producer
    assert fq.op_type == "FakeQuantize"
    assert fq.input(0).producer.op_type == "Relu"
    assert fq.output.users == [pool]
    # the pool's consumers (a Conv and the first residual Add) read it directly
    assert sorted(u.op_type for u in pool.output.users) == ["Add", "Conv"]
    assert not any(u.op_type == "FakeQuantize" for u in pool.output.users)


def test_branch_value_has_one_quantizer_for_conv_and_add(compiled_resnet):
    graph = graph_of(compiled_resnet)
    shared = 0
    for add in (n for n in graph if n.op_type == "Add"):
        for v in add.inputs:
            if _fed_by_fq(v) and v.producer.input(0).producer.op_type == "Relu":
                fq = v.producer
                relu_out = fq.input(0)
                assert relu_out.users == [fq]  # the Relu's only reader is its one quantizer
                assert sorted(u.op_type for u in fq.output.users) == ["Add", "Conv"]
                shared += 1
    assert shared == 4  # the identity shortcuts of the four non-downsampling blocks
    # no value anywhere has two quantizers
    for v in graph.values():
        assert sum(u.op_type == "FakeQuantize" and u.input(0) is v for u in v.users) <= 1, v.name


def test_downsampling_convs_share_their_input_quantizer(compiled_resnet):
    graph = graph_of(compiled_resnet)
    two_convs = [n for n in _fq_nodes(graph) if [u.op_type for u in n.output.users] == ["Conv", "Conv"]]
    assert len(two_convs) == 3  # layer2/3/4: the 1x1 downsample and the 3x3 conv read one quantized value


def test_no_quantizer_inside_a_fused_group(compiled_resnet):
    graph = graph_of(compiled_resnet)
    for fq in _fq_nodes(graph):
        src = fq.input(0).producer
        for user in fq.output.users:
            assert not (src is not None and "fused" in src.meta and src.meta["fused"] == user.meta.get("fused")), \
                (src.name, user.name)
    conv_relu = 0
    for node in graph:
        if node.op_type == "Conv" and [u.op_type for u in node.output.users] == ["Relu"]:
            conv_relu += 1
    # stem + the first conv of each of the 8 blocks read Conv -> Relu with nothing between them
    assert conv_relu == 9


def test_model_output_is_not_quantized(compiled_resnet):
    graph = graph_of(compiled_resnet)
    assert [v.producer.op_type for v in graph.outputs] == ["Gemm"]
    out = [n for n in compiled_resnet.graph.nodes if n.op == "output"][0]
    (result,) = out.args if not isinstance(out.args[0], (tuple, list)) else out.args[0]
    assert result.op == "call_function" and "linear" in str(result.target)


def test_weights_per_channel_activations_per_tensor(compiled_resnet):
    graph = graph_of(compiled_resnet)
    weight_fqs = [n for n in _fq_nodes(graph) if n.input(0).const is not None]
    act_fqs = [n for n in _fq_nodes(graph) if n.input(0).const is None]
    assert (len(weight_fqs), len(act_fqs)) == (21, 30)
    for fq in weight_fqs:
        w = fq.input(0).const
        user = fq.output.users[0]
        low, high = fq.input(1).const, fq.input(2).const
        assert fq.attrs["levels"] == 255  # narrow range: int8 [-127, 127]
        if user.op_type == "Conv":
            assert low.shape == (w.shape[0], 1, 1, 1)
        else:
            assert user.op_type == "Gemm" and low.shape == (1000, 1)
        np.testing.assert_array_equal(low, -high)  # symmetric
        # each channel's range is its own max |w|
        axes = tuple(range(1, w.ndim))
        np.testing.assert_allclose(high.reshape(-1), np.abs(w).max(axis=axes), rtol=1e-6)
    for fq in act_fqs:
        assert fq.attrs["levels"] == 256
        assert np.asarray(fq.input(1).const).shape == ()
    for m in _fq_modules(compiled_resnet):
        if m.low.dim() == 4:
            assert m.levels == 255 and m.low.shape[1:] == (1, 1, 1)


def _weight_grid_use(graph) -> dict[str, int]:
    """For each weight FakeQuantize (by the node it feeds): the largest integer its weight takes on the grid."""
    used = {}
    for fq in _fq_nodes(graph):
        w = fq.input(0).const
        if w is not None:
            step = (fq.input(2).const - fq.input(1).const) / (fq.attrs["levels"] - 1)
            used[fq.output.uses[0][0].name] = int(np.round((np.abs(w) / step).max()))
    return used


@pytest.mark.parametrize("mode", ["enable", "first_layer", "disable", None])
def test_overflow_fix_uses_half_the_weight_grid_where_asked(fused, mode):
    options = {} if mode is None else {"overflow_fix": mode}
    graph = _quantize_pass(fused("resnet18"), _random_dataset((1, 3, 32, 32), n=1), options=options)
    weight_fqs = [n for n in _fq_nodes(graph) if n.input(0).const is not None]
    assert len(weight_fqs) == 21
    # the half grid keeps 255 levels (OpenVINO runs only 255/256-level weights as INT8) and uses [-63, 63]
    assert {fq.attrs["levels"] for fq in weight_fqs} == {255}
    assert {fq.attrs["levels"] for fq in _fq_nodes(graph) if fq.input(0).const is None} == {256}
    used = _weight_grid_use(graph)
    first_conv = next(n.name for n in graph if n.op_type == "Conv")
    half = {"enable": set(used), "disable": set(), "first_layer": {first_conv}, None: {first_conv}}[mode]
    assert {name for name, u in used.items() if u == 63} == half
    assert {name for name, u in used.items() if u == 127} == set(used) - half


class _TwoStems(torch.nn.Module):
    """Two inputs; x feeds two convolutions directly, y reaches one only through a Linear and a reshape."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 4, 1)
        self.lin = torch.nn.Linear(12, 48)
        self.c = torch.nn.Conv2d(3, 4, 1)
        self.d = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x, y):
        z = self.c(self.lin(y).reshape(-1, 3, 4, 4))
        return self.d(self.a(x) + self.b(x)) + z


def test_first_layer_overflow_fix_takes_the_first_convolutions_from_every_input():
    example = (torch.randn(2, 3, 4, 4), torch.randn(2, 12))
    graph = _fused(_TwoStems().eval(), *example)
    data = lowbit.Dataset([(torch.randn(1, 3, 4, 4), torch.randn(1, 12)) for _ in range(4)])
    graph = _quantize_pass(graph, data, options={"overflow_fix": "first_layer"})
    used = _weight_grid_use(graph)
    kinds = {n.name: (n.op_type, n.input(1).name) for n in graph if n.op_type in ("Conv", "Gemm")}
    half = sorted(kinds[name][1].split("_fq")[0] for name, u in used.items() if u == 63)
    # the walk passes the Linear (not a convolution) and stops at the first convolutions
    assert half == ["a.weight", "b.weight", "c.weight"], kinds


# --------------------------------------------------------------------------- unified scales on Concat


def _concat_model():
    factory, shape = REFERENCE_MODELS["concat"]
    return factory(), shape


def test_concat_inputs_share_a_group():
    model, shape = _concat_model()
    graph = _fused(model, torch.randn(*shape))
    points = place_quantizers(graph, load_hw_config("CPU"))
    concats = [n for n in graph if n.op_type == "Concat"]
    assert len(concats) == 2
    groups = set()
    for cat in concats:
        feeding = [p for p in points if any(c is cat for c, _ in p.consumers)]
        assert len(feeding) == len(cat.inputs) == 4
        assert len({p.group for p in feeding}) == 1 and feeding[0].group is not None
        groups.add(feeding[0].group)
        # the quantizer asked for the Concat's output moved up to its inputs
        assert not any(p.value is cat.output for p in points)
    assert len(groups) == 2  # one group per Concat
    assert all(p.group is None for p in points if not any(c.op_type == "Concat" for c, _ in p.consumers))


def test_concat_ranges_identical_after_compile():
    model, shape = _concat_model()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(*shape, generator=g) for _ in range(4)]
    q = lowbit.compile(model, PTQ, dataset=lowbit.Dataset(data), progress=False)
    cats = [n for n in q.graph.nodes if n.target is torch.ops.aten.cat.default]
    assert len(cats) == 2
    for cat in cats:
        fqs = [q.get_submodule(a.target) for a in cat.args[0]]
        assert all(isinstance(m, FakeQuantize) for m in fqs)
        for m in fqs[1:]:
            assert torch.equal(m.low, fqs[0].low) and torch.equal(m.high, fqs[0].high)
    # the shared range is the union of the branches' ranges (mean over samples of each sample's max)
    branch_max = collections.defaultdict(list)
    hooks = [getattr(model.block1, b).register_forward_hook(
        lambda mod, inp, out, b=b: branch_max[b].append(out.flatten(1).amax(1)))
        for b in ("branch1", "branch2", "branch3", "branch4")]
    with torch.no_grad():
        model(torch.cat(data))
    for h in hooks:
        h.remove()
    want = max(float(torch.cat(v).mean()) for v in branch_max.values())
    first = q.get_submodule(cats[0].args[0][0].target)
    assert first.low.item() == 0.0
    assert first.high.item() == pytest.approx(want, rel=1e-4)


# --------------------------------------------------------------------------- integer edges


class EmbedLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, tokens):
        return self.fc(self.emb(tokens))


def _int_model(name):
    torch.manual_seed(0)
    if name == "embed_linear":
        return EmbedLinear().eval(), (torch.randint(0, 20, (2, 6)),)
    if name == "vit":
        factory, shape = REFERENCE_MODELS["vit"]
        return factory(), (torch.randn(*shape),)
    factory, inputs, _ = OP_MODELS[name]
    return factory().eval(), inputs(2)


@pytest.mark.parametrize("name", ["shapes", "embed_linear", "vit"])
def test_integer_edges_are_never_quantized(name):
    model, inputs = _int_model(name)
    graph = _fused(model, *inputs)
    int_values = [v for v in graph.values() if v.dtype is not None and v.dtype.startswith(("int", "uint", "bool"))]
    assert int_values, "the model must have integer values for this test to mean anything"
    points = place_quantizers(graph, load_hw_config("CPU"))
    assert points
    assert all(p.value.dtype.startswith("float") for p in points), [(p.name, p.value.dtype) for p in points]
    # end to end too: no FakeQuantize reads an integer value, and the outputs are still computed
    q = lowbit.compile(model, PTQ, dataset=lowbit.Dataset([inputs]), progress=False)
    for fq in _fq_nodes(graph_of(q)):
        assert fq.input(0).dtype.startswith("float"), fq.name
    with torch.no_grad():
        q(*inputs)


def test_embedding_quantizer_stays_below_the_lookup():
    model, inputs = _int_model("embed_linear")
    graph = _fused(model, *inputs)
    points = [p for p in place_quantizers(graph, load_hw_config("CPU")) if p.kind == "activation"]
    assert len(points) == 1
    (p,) = points
    # the Gather's data is a constant and its indices are int64: the request cannot move above it
    assert p.value.producer.op_type == "Gather"
    assert p.value is not graph.inputs[0]


class _SplitHeads(torch.nn.Module):
    """qkv = linear(x); v = qkv[:, :, 2] (a Gather) feeds a MatMul; q and k feed others."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x, w):
        qkv = self.qkv(x).unflatten(-1, (3, 8))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        return torch.matmul(v, w) + torch.sigmoid(q) * k


@pytest.mark.parametrize("select", ["Gather", "Slice"])
def test_a_quantizer_stays_below_an_op_that_keeps_part_of_its_input(select):
    """v = qkv[:, :, 2]: quantized at the select, on v's range, not above it on the whole fused qkv tensor."""
    model = _SplitHeads()
    if select == "Slice":
        model.forward = lambda x, w: model.qkv(x)[:, :, 16:24] @ w + model.qkv(x)[:, :, :8]
    x, w = torch.randn(2, 4, 8), torch.randn(8, 8)
    graph = _fused(model, x, w)
    matmul = next(n for n in graph if n.op_type == "MatMul" and n.input(1).const is None)
    points = place_quantizers(graph, load_hw_config("CPU"))
    (point,) = [p for p in points if any(c is matmul for c, _ in p.consumers) and p.kind == "activation"
                and p.value is not matmul.input(1)] or [None]
    producer = point.value.producer
    while producer.op_type in ("Squeeze", "Unsqueeze", "Reshape"):  # a Gather may be written as Slice+Squeeze
        producer = producer.input(0).producer
    assert producer.op_type in ("Gather", "Slice"), producer.op_type


class _Heads(torch.nn.Module):
    """HuggingFace's attention scores: q and k projected, viewed into heads at the batch read from the input
    (`x.size(0)`, a computed shape in a dynamic-batch capture) or at a fixed one, transposed, multiplied."""

    def __init__(self, batch=None):
        super().__init__()
        self.q, self.k, self.batch = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), batch

    def forward(self, x):
        heads = lambda t: t.view(self.batch or x.size(0), -1, 2, 8).transpose(1, 2)  # noqa: E731
        return heads(self.q(x)) @ heads(self.k(x)).transpose(-1, -2)


@pytest.mark.parametrize("batch", [None, 2], ids=["batch read at run time", "fixed batch"])
def test_query_and_key_quantizers_sit_on_their_projections_whatever_the_heads_view_reads(batch):
    """The requests of the scores MatMul move up through the heads' Transpose and Reshape onto the projections'
    outputs, where OpenVINO fuses them into the projections; a Reshape's shape input, computed from the batch or
    constant, is not a value the quantizer reads and does not stop them."""
    graph = _fused(_Heads(batch), torch.randn(2, 5, 16))
    scores = next(n for n in graph if n.op_type == "MatMul" and n.input(1).const is None)
    points = [p for p in place_quantizers(graph, load_hw_config("CPU"), transformer=True)
              if p.kind == "activation" and scores.name in p.layers]
    assert sorted(p.value.producer.op_type for p in points) == ["Add", "Add"]  # the Linear's bias Add
    assert {p.value.producer.input(0).producer.input(1).name for p in points} == {"q.weight.T", "k.weight.T"}


# --------------------------------------------------------------------------- presets and model types


@pytest.fixture(scope="module")
def digits():
    from examples.digits import load_digits_split, trained

    x_train, _, _, _ = load_digits_split()
    return trained("digits_cnn"), lowbit.Dataset([x_train[i:i + 8] for i in range(0, 64, 8)])


def _activation_ranges(q):
    out = {}
    for fq in _fq_nodes(graph_of(q)):
        if fq.input(0).const is None:
            out[fq.name] = (float(fq.input(1).const), float(fq.input(2).const), fq.meta.get("config"))
    return out


def test_performance_preset_gives_symmetric_activations(digits):
    model, ds = digits
    ranges = _activation_ranges(lowbit.compile(model, PTQ, dataset=ds, preset="performance", progress=False))
    signed = 0
    for name, (low, high, config) in ranges.items():
        assert config == "a8_sym", name
        if low == 0.0:
            continue
        signed += 1
        assert low == pytest.approx(-high * 128 / 127, rel=1e-6), name
    assert signed >= 1  # the residual conv's output is signed


def test_mixed_preset_gives_asymmetric_signed_activations(digits):
    model, ds = digits
    perf = _activation_ranges(lowbit.compile(model, PTQ, dataset=ds, preset="performance", progress=False))
    mixed = _activation_ranges(lowbit.compile(model, PTQ, dataset=ds, preset="mixed", progress=False))
    assert perf.keys() == mixed.keys()
    asymmetric = 0
    for name, (low, high, config) in mixed.items():
        assert config == "a8_asym", name
        step = (high - low) / 255
        zero_point = -low / step
        assert zero_point == pytest.approx(round(zero_point), abs=1e-3), name  # 0.0 is exactly a level
        if perf[name][0] < 0:
            assert low < 0 < high
            assert low != pytest.approx(-high * 128 / 127, rel=1e-3), name
            # the asymmetric range is tighter than the symmetric one
            assert high - low < perf[name][1] - perf[name][0]
            asymmetric += 1
        else:
            assert low == 0.0
    assert asymmetric >= 1


def _vit():
    factory, shape = REFERENCE_MODELS["vit"]
    g = torch.Generator().manual_seed(0)
    return factory(), lowbit.Dataset([torch.randn(*shape, generator=g) for _ in range(2)])


def _elementwise_fed_by_fq(graph):
    return [n.name for n in graph if n.op_type in ("Add", "Mul") and any(_fed_by_fq(v) for v in n.inputs if v)]


def test_transformer_model_type_leaves_add_and_mul_fp32():
    model, ds = _vit()
    default = graph_of(lowbit.compile(model, PTQ, dataset=ds, progress=False))
    transformer = graph_of(lowbit.compile(model, PTQ, dataset=ds, model_type="transformer", progress=False))
    assert _elementwise_fed_by_fq(default)  # residual adds are quantized by default ...
    assert _elementwise_fed_by_fq(transformer) == []  # ... and not for transformers
    fqs = _fq_nodes(transformer)
    assert fqs and len(fqs) < len(_fq_nodes(default))
    assert sum(fq.input(0).const is not None for fq in fqs) == 10  # every linear's weight is still quantized
    # the linears still read quantized weights, and the MatMuls quantized (LayerNorm/Gelu) activations
    linears = [n for n in transformer if n.op_type in ("MatMul", "Gemm")]
    assert len(linears) == 9 and all(_fed_by_fq(n.input(1)) for n in linears)
    for matmul in (n for n in linears if n.op_type == "MatMul"):
        v = matmul.input(0)
        while v.producer.op_type in ("Reshape", "Transpose"):  # the attention projections: moved up through these
            v = v.producer.input(0)
        assert _fed_by_fq(v), matmul.name
    # transformer implies the mixed preset: asymmetric activations, except the attention's query and key, which
    # are symmetric (as NNCF's transformer model type; OpenVINO's INT8 attention needs zero-point-free grids)
    attention = [n for n in transformer if n.op_type == "Attention"]
    assert len(attention) == 2
    query_key = {id(a.input(i).producer) for a in attention for i in (0, 1)}
    activation_fqs = [fq for fq in fqs if fq.input(0).const is None]
    assert all(fq.meta.get("config") == "a8_sym" for fq in activation_fqs if id(fq) in query_key)
    assert len([fq for fq in activation_fqs if id(fq) in query_key]) == 4
    assert {fq.meta.get("config") for fq in activation_fqs if id(fq) not in query_key} == {"a8_asym"}


# --------------------------------------------------------------------------- ignored scopes


@pytest.fixture(scope="module")
def resnet_fused(fused):
    return fused("resnet18"), _random_dataset((1, 3, 32, 32), n=1)


def _count_with(resnet_fused, scope):
    graph, ds = resnet_fused
    return len(_fq_nodes(_quantize_pass(graph, ds, ignored_scope=scope))), graph


def test_no_ignored_scope_gives_51(resnet_fused):
    assert _count_with(resnet_fused, None)[0] == 51


@pytest.mark.parametrize("scope,expected", [
    (IgnoredScope(names=["conv2d_2"]), 51 - 2),  # its weight and its input (read by it alone)
    (IgnoredScope(names=["add_1"]), 51 - 1),  # its conv branch; the shortcut's quantizer still feeds a Conv
    (IgnoredScope(names=["linear"]), 51 - 2),  # the classifier's weight and its pooled input
    (IgnoredScope(patterns=[r"add_[1-7]"]), 51 - 10),  # 7 conv branches + 3 downsampling shortcuts
    (IgnoredScope(patterns=[r"^conv2d_1\d$"]), 51 - 10 - 6),  # conv2d_10..19: 10 weights, 6 inputs only they read
    (IgnoredScope(types=["Add"]), 51 - 11),  # 8 conv branches + 3 downsampling shortcuts
    (IgnoredScope(subgraphs=[Subgraph(inputs=["conv2d_1"], outputs=["add"])]), 51 - 5),
])
def test_ignored_scope_removes_exactly_those_quantizers(resnet_fused, scope, expected):
    count, graph = _count_with(resnet_fused, scope)
    assert count == expected
    ignored = scope.resolve(graph)
    q = _quantize_pass(graph, resnet_fused[1], ignored_scope=scope)
    for node in q:
        if node.name in ignored:
            assert not any(_fed_by_fq(v) for v in node.inputs if v is not None), node.name


def test_ignoring_a_pool_consumer_keeps_the_quantizer_below_the_pool(resnet_fused):
    graph, ds = resnet_fused
    q = _quantize_pass(graph, ds, ignored_scope=IgnoredScope(names=["conv2d_1"]))
    assert len(_fq_nodes(q)) == 50  # only conv2d_1's weight is gone
    pool = next(n for n in q if n.op_type == "MaxPool")
    assert not _fed_by_fq(pool.input(0))  # the add alone asks now: its quantizer stays after the pool
    users = pool.output.users
    assert sorted(u.op_type for u in users) == ["Conv", "FakeQuantize"]
    fq = next(u for u in users if u.op_type == "FakeQuantize")
    assert [u.name for u in fq.output.users] == ["add"]


def test_types_add_removes_add_input_quantizers(resnet_fused):
    graph, ds = resnet_fused
    q = _quantize_pass(graph, ds, ignored_scope=IgnoredScope(types=["Add"]))
    adds = [n for n in q if n.op_type == "Add"]
    assert len(adds) == 8
    assert not any(_fed_by_fq(v) for n in adds for v in n.inputs)


@pytest.mark.parametrize("scope,kind,closest", [
    (IgnoredScope(names=["conv2d_99"]), "name", "conv2d_9"),
    (IgnoredScope(names=["maxpool2d"]), "name", "max_pool2d"),
    (IgnoredScope(types=["Conv2d"]), "type", "Conv"),
    (IgnoredScope(patterns=["layer4.*conv"]), "pattern", None),
    (IgnoredScope(subgraphs=[Subgraph(inputs=["conv2d_1"], outputs=["ad"])]), "subgraph node", "add"),
])
def test_ignored_scope_entry_matching_nothing(resnet_fused, scope, kind, closest):
    graph, ds = resnet_fused
    with pytest.raises(lowbit.IgnoredScopeError) as info:
        _quantize_pass(graph, ds, ignored_scope=scope)
    message = str(info.value)
    assert f"ignored scope {kind} " in message and "matches no node" in message
    if closest is not None:
        assert "closest:" in message
        assert closest in re.split(r"closest:", message)[1].split(".")[0].replace(" ", "").split(",")


def test_ignored_scope_without_validation_ignores_unknown_entries(resnet_fused):
    scope = IgnoredScope(names=["conv2d_2", "no_such_node"], validate=False)
    assert _count_with(resnet_fused, scope)[0] == 49


def test_ignored_scope_through_compile():
    model, shape = _concat_model()
    ds = lowbit.Dataset([torch.randn(*shape)])
    full = lowbit.compile(model, PTQ, dataset=ds, progress=False)
    part = lowbit.compile(model, PTQ, dataset=ds, ignored_scope=IgnoredScope(types=["Gemm"]), progress=False)
    # the classifier's weight and the pooled input only it reads
    assert len(_fq_modules(full)) - len(_fq_modules(part)) == 2
    with pytest.raises(lowbit.IgnoredScopeError, match="closest: Gemm"):
        lowbit.compile(model, PTQ, dataset=ds, ignored_scope=IgnoredScope(types=["Gem"]), progress=False)


# --------------------------------------------------------------------------- quantized conv outputs (ONNX Runtime)


def _se_graph():
    factory, shape = REFERENCE_MODELS["se"]
    return _fused(factory(), torch.randn(*shape))


@pytest.mark.parametrize("device, extra", [("CPU_ORT", 8), ("CPU", 0), ("ANY", 0), ("NPU", 0)])
def test_a_conv_output_read_by_an_unfolded_activation_gets_its_own_quantizer(device, extra):
    """Each of the squeeze-excite model's 8 Convs feeds a SiLU, HardSwish or HardSigmoid of its fused pattern, which
    asks for no quantizer; for CPU_ORT (quantized_output) the Conv's output gets one between the two, so that
    ONNX Runtime runs the Conv as QLinearConv; the other devices place NNCF's quantizers only."""
    graph = _se_graph()
    points = place_quantizers(graph, load_hw_config(device))
    convs = [n for n in graph if n.op_type == "Conv"]
    assert len(convs) == 8
    on_outputs = [p for p in points if p.value.producer is not None and p.value.producer.op_type == "Conv"]
    assert len(on_outputs) == extra
    for p in on_outputs:
        assert [c.op_type for c, _ in p.consumers] in (["Swish"], ["HardSwish"], ["HardSigmoid"])
        assert p.layers == (p.value.producer.name,)  # placed for the Conv, not asked for by its reader
    baseline = place_quantizers(graph, load_hw_config("CPU"))
    assert sum(p.kind == "activation" for p in points) == sum(p.kind == "activation" for p in baseline) + extra


def test_a_relu_conv_output_needs_no_extra_quantizer_and_a_vit_patch_embedding_gets_none(fused):
    """For CPU_ORT too, a Conv -> Relu already has its output quantized after the Relu (ONNX Runtime folds the Relu),
    so ResNet18 keeps NNCF's counts; a ViT's patch embedding, whose output reshapes carry into the class-token
    Concat, gets no output quantizer (OpenVINO mishandles that Concat's dequantized input)."""
    points = place_quantizers(fused("resnet18"), load_hw_config("CPU_ORT"))
    assert (sum(p.kind == "weight" for p in points), sum(p.kind == "activation" for p in points)) == (21, 30)
    factory, shape = REFERENCE_MODELS["vit"]
    q = lowbit.quantize(factory(), _random_dataset(shape), model_type="transformer", target_device="CPU_ORT")
    conv = next(n for n in q.lowbit_graph if n.op_type == "Conv")
    assert conv.input(0).producer.op_type == "FakeQuantize"  # a quantized layer ...
    assert [u.op_type for u in conv.output.users] == ["Reshape"]  # ... whose output stays FP32


@pytest.mark.parametrize("origin", ["torch", "onnx"])
def test_the_fix_for_cpus_without_vnni_keeps_query_times_key_fp32(origin):
    """A MatMul of two activations (the ViT's query x key: an Attention node from torch, a MatMul reading the
    Softmax's inputs from an ONNX file) multiplies two full 8-bit grids, which saturate on a CPU without VNNI
    where it runs as a plain INT8 MatMul: overflow_fix="enable" leaves it FP32, with its weights on the 7-bit
    grid; the default quantizes both of its inputs."""
    model, ds = _vit()
    source = model if origin == "torch" else lowbit.codegen(lowbit.lower(model, (next(iter(ds)),)), "onnx")
    if origin == "onnx":
        ds = lowbit.Dataset([x.numpy() for x in ds])
    def is_weight(v) -> bool:  # a constant, or a quantizer of one
        return v.const is not None or (v.producer is not None and v.producer.input(0).const is not None)

    def is_quantized(v) -> bool:
        return v.producer is not None and v.producer.op_type in ("FakeQuantize", "DequantizeLinear")

    quantized = {}
    for mode in ("first_layer", "enable"):
        q = lowbit.compile(source, PTQ, dataset=ds, model_type="transformer", overflow_fix=mode, progress=False)
        graph = graph_of(q) if origin == "torch" else lowbit.lower(q)
        two = [n for n in graph if n.op_type in ("Attention", "MatMul")
               and not any(v is not None and is_weight(v) for v in n.inputs[:2])]
        quantized[mode] = sorted(sum(is_quantized(v) for v in n.inputs[:2]) for n in two)
    # from torch: the two Attention nodes; from ONNX: query x key and probabilities x V (FP32 either way) of each
    expected = {"torch": ([2, 2], [0, 0]), "onnx": ([0, 0, 2, 2], [0, 0, 0, 0])}[origin]
    assert (quantized["first_layer"], quantized["enable"]) == expected


class _PooledCNN(torch.nn.Module):
    """Conv -> Relu -> global average -> Linear, the average as AdaptiveAvgPool2d(1) (GlobalAveragePool) or as
    x.mean((2, 3)) (ReduceMean: what torch.onnx.export's dynamo exporter writes for the pool too)."""

    def __init__(self, as_mean: bool):
        super().__init__()
        self.as_mean = as_mean
        self.conv, self.fc, self.pool = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 4), torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.mean((2, 3)) if self.as_mean else torch.flatten(self.pool(y), 1))


class _RMSNormHead(torch.nn.Module):
    """Linear -> RMSNorm (x * rsqrt(mean(x^2))) -> Linear: a transformer's decomposed norm."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        return self.b(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))


@pytest.mark.parametrize("device", ["ANY", "CPU", "CPU_ORT", "GPU", "NPU"])
def test_a_spatial_mean_is_quantized_as_a_global_average_pool(device):
    """NNCF quantizes a ReduceMean's input as lowbit does a GlobalAveragePool's: the same CNN gets the same
    quantizers whichever form its pool takes (torch.onnx.export's default exporter writes ReduceMean)."""
    torch.manual_seed(0)
    pooled = _PooledCNN(as_mean=False).eval()
    meaned = _PooledCNN(as_mean=True).eval()
    meaned.load_state_dict(pooled.state_dict())
    x = torch.randn(1, 3, 8, 8)
    hw = load_hw_config(device)
    counts = {}
    for name, model in (("pool", pooled), ("mean", meaned)):
        graph = _fused(model, x)
        points = place_quantizers(graph, hw)
        counts[name] = (sum(p.kind == "weight" for p in points), sum(p.kind == "activation" for p in points))
        average = next(n for n in graph if n.op_type in ("GlobalAveragePool", "ReduceMean"))
        assert any(p.value is average.input(0) for p in points), name
    assert counts["pool"] == counts["mean"] == (2, 3)  # conv and fc weights; x, the average's input, fc's input


def test_the_transformer_model_type_leaves_a_norms_mean_fp32():
    """As NNCF's transformer model type: a ReduceMean (an RMSNorm's mean of squares) gets no quantizer, which
    the default model type gives it."""
    x = torch.randn(2, 8)
    quantized = {}
    for model_type in (None, "transformer"):
        torch.manual_seed(0)
        q = lowbit.quantize(_RMSNormHead().eval(), lowbit.Dataset([x]), model_type=model_type)
        mean = next(n for n in graph_of(q) if n.op_type == "ReduceMean")
        quantized[model_type] = _fed_by_fq(mean.input(0))
    assert quantized == {None: True, "transformer": False}


def test_a_depthwise_conv_transpose_gets_a_range_per_filter_and_deploys_in_both_runtimes(tmp_path):
    """A depthwise ConvTranspose's weight is [C, 1, k, k]: its per-channel ranges run along axis 0 (one per
    filter), not along its axis 1 of one entry, which gave all 24 filters one range. ONNX Runtime and OpenVINO
    run what lowbit writes as the torch simulation does."""
    import onnxruntime as ort
    import openvino as ov
    from deploy_checks import sqnr
    from models import Decoder, _reference

    model = _reference(Decoder)()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    q = lowbit.quantize(model, lowbit.Dataset([x[i:i + 2] for i in range(0, 8, 2)]))
    node = next(n for n in graph_of(q) if n.op_type == "ConvTranspose" and n.attrs.get("group", 1) == 24)
    low = node.input(1).producer.input(1).const
    assert low.shape == (24, 1, 1, 1) and len(np.unique(low)) == 24
    with torch.no_grad():
        simulated = q(x).numpy()
    session = ort.InferenceSession(str(lowbit.export(q, tmp_path / "d.onnx")), providers=["CPUExecutionProvider"])
    assert sqnr(simulated, session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]) > 35
    compiled = ov.Core().compile_model(str(lowbit.export(q, tmp_path / "d.xml")), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    assert sqnr(simulated, compiled(x.numpy())[compiled.output(0)]) > 35


class _RelativeBuckets(torch.nn.Module):
    """T5's relative-position buckets in small: the log of each distance (-inf at distance 0), scaled in float
    and cast to an embedding index, added to attention-like scores."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.bias = torch.nn.Embedding(8, 1)

    def forward(self, x):
        position = torch.arange(x.shape[1])
        distance = (position[None, :] - position[:, None]).abs()
        far = 4 + (torch.log(distance.float() / 4) / math.log(4) * 4).to(torch.long)
        bucket = torch.where(distance < 4, distance, far).clamp(max=7)
        return self.fc(x) @ x.transpose(1, 2) + self.bias(bucket).squeeze(-1)


def test_index_math_gets_no_quantizer_and_a_dynamic_length_model_runs():
    """Calibrated on items of several lengths, the sequence dim stays dynamic and the bucket arithmetic stays in
    the graph: its Log, Divs and Mul reach the output only cast to an index, so they get no quantizer (the Div's
    range was -inf..x: a NaN grid, and the quantized T5 encoder stopped with "zero_point must be between
    quant_min and quant_max"). The scores' layers are quantized as before, and the module runs at new lengths."""
    from deploy_checks import sqnr

    from lowbit.quant.placement import index_math

    torch.manual_seed(0)
    model = _RelativeBuckets().eval()
    items = [torch.randn(2, n, 8) for n in (5, 9, 6, 12) * 4]
    q = lowbit.quantize(model, lowbit.Dataset(items))
    graph = graph_of(q)
    bucket_ops = {n.name for n in graph if n.op_type in ("Log", "Div", "Mul")}
    assert len(bucket_ops) == 4 and bucket_ops <= index_math(graph)  # x / 4, log, / log(4), * 4
    quantized = {n.input(0).producer.op_type for n in graph if n.op_type == "FakeQuantize"
                 and n.input(0).producer is not None}
    # x (a graph input), the Linear's output (its bias Add) read by the MatMul, and the Add's two inputs: the
    # scores (MatMul) and the position bias (the embedding's Gather); nothing of the bucket arithmetic
    assert quantized == {"Add", "MatMul", "Gather"}
    for n in (7, 16):
        x = torch.randn(3, n, 8) * 0.5  # inside the calibrated ranges (mean of the items' min and max)
        with torch.no_grad():
            assert sqnr(model(x).numpy(), q(x).numpy()) > 30


class _MaskedScores(torch.nn.Module):
    def __init__(self, fill: float):
        super().__init__()
        self.q, self.k, self.fill = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), fill

    def forward(self, x):
        return torch.softmax(self.q(x) + self.k(x).masked_fill(x > 1.0, self.fill), -1)


@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(torch.float32).min], ids=["-inf", "float32_min"])
def test_an_activation_whose_range_is_not_finite_stays_fp32_with_a_warning(fill):
    """Scores masked with -inf calibrate to a range of -inf .. x, and masked with float32's lowest value (as
    transformers' Gemma-2 and Bloom masks are) to a symmetric grid whose low end is -inf in float32: no grid
    spans either, so that quantizer is left out (FP32), with a warning that names it, and the other input of
    the Add keeps its own (a NaN grid there stopped the quantized module)."""
    torch.manual_seed(0)
    model = _MaskedScores(fill).eval()
    with pytest.warns(UserWarning, match=r"1 value\(s\) left in FP32: their calibrated ranges hold inf or NaN"):
        q = lowbit.quantize(model, lowbit.Dataset([torch.randn(2, 4) for _ in range(8)]))
    add = next(n for n in graph_of(q) if n.op_type == "Add")
    assert [_fed_by_fq(v) for v in add.inputs] == [True, False]
    x = torch.randn(64, 4) * 0.5
    with torch.no_grad():
        expected, got = model(x), q(x)
    assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
    assert float((got - expected).abs().max()) < 0.05


class _EmptyHalf(torch.nn.Module):
    """Phi-3's rotary embedding in small: the pass-through half it concatenates is empty (y[..., 4:] of 4)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return torch.cat([y[..., :4] * 2.0, y[..., 4:] * 3.0], -1)


def test_an_empty_tensor_gets_no_quantizer():
    """An empty value (Phi-3's rotary pass-through half) asked for a quantizer, and calibrating it failed (numpy:
    "zero-size array to reduction operation minimum") where cleanup had not removed it: in QAT
    (create_compressed_model runs no cleanup). It asks for none now; the rest is quantized."""
    model = _EmptyHalf().eval()
    x = torch.randn(2, 4)
    q = lowbit.compile(model, ["fold_bn", "fuse", "quantize"], dataset=lowbit.Dataset([x, x]))
    graph = graph_of(q)
    empty = [n for n in graph if n.op_type == "FakeQuantize" and 0 in (n.input(0).shape or ())]
    assert empty == [] and sum(n.op_type == "FakeQuantize" for n in graph) >= 3
    with torch.no_grad():
        assert q(x).shape == (2, 4)
