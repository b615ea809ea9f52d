"""Filter pruning (lowbit.prune, the prune_filters pass, lowbit/pruning/): channel dependency groups on every
model family, exact channel counts, outputs that only the removed channels change, torch and ONNX origins alike,
ONNX Runtime and OpenVINO running the result, and the named errors of bad requests."""

import copy
import math

import numpy as np
import onnx
import pytest
import torch
from conftest import run_onnx, run_openvino, train_epochs
from deploy_checks import default_exported
from models import REFERENCE_MODELS, Decoder, ResNeXt, _reference

import lowbit
from lowbit.api import graph_of
from lowbit.pruning import PruneSpec, plan
from lowbit.pruning.masks import _entries
from lowbit.pruning.shrink import _positions, shrink

CNN_FAMILIES = ["resnet18", "mobilenet_v2", "concat", "se", "densenet"]
CLASSIFIERS = {"resnet18": "fc", "mobilenet_v2": "classifier.1", "concat": "fc", "se": "fc", "densenet": "classifier"}


def _model(name):
    factory, shape = REFERENCE_MODELS[name]
    return factory(), torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _layers(graph):
    """{weight module path: (out channels, in channels)} of every Conv and Gemm."""
    found = {}
    for n in graph:
        if n.op_type in ("Conv", "Gemm") and n.input(1).const is not None:
            w = n.input(1).const
            out_axis = 0 if n.op_type == "Conv" or n.attrs.get("transB") else 1
            found[n.input(1).name.removesuffix(".weight")] = (w.shape[out_axis], w.shape[1 - out_axis])
    return found


def test_resnet18_at_half_keeps_half_of_every_layers_filters_and_the_classifier_outputs():
    model, x = _model("resnet18")
    pruned = lowbit.prune(model, 0.5, example_inputs=(x,))
    layers = _layers(graph_of(pruned))
    assert layers["conv1"] == (32, 3)
    for stage, width in zip((1, 2, 3, 4), (64, 128, 256, 512)):
        for block in (0, 1):
            for conv in ("conv1", "conv2"):
                assert layers[f"layer{stage}.{block}.{conv}"][0] == width // 2
    assert layers["layer2.0.downsample.0"] == (64, 32)  # the shortcut conv is tied to the residual group
    assert layers["fc"] == (10, 256)  # the classifier keeps its 10 outputs and reads 256 of 512 channels
    with torch.no_grad():
        assert pruned(x).shape == (2, 10)


@pytest.mark.parametrize("name", CNN_FAMILIES)
def test_every_prunable_filter_count_is_halved_and_the_model_still_runs(name):
    model, x = _model(name)
    before = _layers(lowbit.lower(model, (x,)))
    pruned = lowbit.prune(model, 0.5, example_inputs=(x,))
    after = _layers(graph_of(pruned))
    report = graph_of(pruned).meta["pruning"]
    blocked = [row["layers"] for row in report if row["blocked"]]
    assert blocked == [[CLASSIFIERS[name]]]  # only the classifier: its outputs are the model's
    assert after.keys() == before.keys()
    for layer, (out, _) in before.items():
        assert after[layer][0] == (out if layer == CLASSIFIERS[name] else out // 2), layer  # odd: the smaller half
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape


@pytest.mark.parametrize("name", CNN_FAMILIES)
def test_only_the_removed_channels_change_the_output(name):
    """Zero every weight that reads a channel about to be removed: the channels then contribute nothing, so the
    pruned model must compute what the zeroed one does. Any misplaced offset (Concat), repeat (Flatten) or
    forgotten member (BN, depthwise, SE scale) shows up as a difference."""
    model, x = _model(name)
    graph = lowbit.lower(model, (x,))
    pruned, zeroed = _pruned_and_zeroed(graph, x)
    assert sum(v.const.size for v in graph.constants.values()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(pruned, zeroed, rtol=1e-5, atol=1e-6)


def _zero_what_reads_removed_channels(chosen):
    """Zero every weight entry that reads a channel `chosen` removes (a grouped Conv's: in its own block)."""
    for m in chosen.groups.members:
        positions = _positions(m.segments, chosen.removed, chosen.groups.find) if m.role == "in" else []
        if len(positions):
            array = np.array(m.value.const)
            array[_entries(array.shape, m.axis, positions, m.conv_groups)] = 0
            m.value.const = array


def _pruned_and_zeroed(graph, x):
    """The outputs of `graph` pruned at half (shrunk in place) and of `graph` with only the weights that read
    the channels to remove zeroed, in torch."""
    chosen = plan(graph, PruneSpec(0.5))
    assert chosen.removed
    _zero_what_reads_removed_channels(chosen)
    with torch.no_grad():
        zeroed = lowbit.codegen(graph, "torch")(x)
    shrink(graph, chosen.groups, chosen.removed)
    graph.verify()
    with torch.no_grad():
        return lowbit.codegen(graph, "torch")(x), zeroed


def _resnext():
    return _reference(ResNeXt)(), torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_a_resnext_prunes_its_grouped_convolutions_evenly_in_every_block():
    """A grouped Conv keeps its 4 blocks, each with as many input channels and filters as the others (each loses
    half); a depthwise Conv with two filters per channel keeps both filters of each channel the residual width
    keeps (its group follows: 16 -> 8), and the classifier reads the 16 filters left."""
    model, x = _resnext()
    pruned = lowbit.prune(model, 0.5, example_inputs=(x,))
    graph = graph_of(pruned)
    convs = {n.input(1).name.removesuffix(".weight"): (n.input(1).const.shape[:2], n.attrs.get("group"))
             for n in graph if n.op_type in ("Conv", "Gemm")}
    assert convs == {"stem.0": ((8, 1), 1), "block1.reduce.0": ((8, 8), 1), "block1.grouped.0": ((8, 2), 4),
                     "block1.expand.0": ((8, 8), 1), "block2.reduce.0": ((8, 8), 1),
                     "block2.grouped.0": ((16, 2), 4), "block2.expand.0": ((8, 16), 1), "spread.0": ((16, 1), 8),
                     "fc": ((10, 16), None)}
    residual = next(r for r in graph.meta["pruning"] if "stem.0" in r["layers"])
    assert (residual["channels"], residual["kept"], residual["blocked"]) == (16, 8, None)
    chosen = plan(lowbit.lower(model, (x,)), PruneSpec(0.5))
    wide = next(g for g in chosen.groups.groups() if g.names == ["block2.grouped.0"])
    assert wide.blocks == 4 and np.bincount(chosen.removed[wide.id] // 8).tolist() == [4, 4, 4, 4]
    with torch.no_grad():
        assert pruned(x).shape == (2, 10)


def test_a_pruned_resnext_computes_what_zeroing_the_removed_channels_does_in_onnx_runtime_and_openvino():
    model, x = _resnext()
    graph = lowbit.lower(model, (x,))
    _shrinks_to_what_zeroing_the_removed_channels_gives(graph, plan(graph, PruneSpec(0.5)), x, atol=1e-5,
                                                        openvino=True)


def test_a_resnext_from_onnx_loses_the_parameters_it_loses_from_torch():
    """torch.onnx.export's file (BatchNorm folded into the convolutions, as a user's FP32 file has it)."""
    import io

    model, x = _resnext()
    from_torch = graph_of(lowbit.prune(model, 0.5, example_inputs=(x,)))
    file = io.BytesIO()
    torch.onnx.export(copy.deepcopy(model), (x,), file, dynamo=False, input_names=["x"])
    from_onnx = lowbit.lower(lowbit.prune(onnx.load_from_string(file.getvalue()), 0.5))

    def params(graph):
        return sum(n.input(1).const.size for n in graph if n.op_type in ("Conv", "Gemm"))

    assert params(from_onnx) == params(from_torch) < params(lowbit.lower(model, (x,))) // 2


def test_grouped_convolutions_prune_under_4_bit_qat_and_strip_to_a_smaller_quantized_model(tmp_path):
    """NNCF's combined config on the ResNeXt: the masks zero each block's own input columns in the weights the
    quantizers read, and strip / export cut them, the grouped convs keeping their 4 blocks."""
    model, _ = _resnext()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    config = {"input_info": {"sample_size": [2, 1, 8, 8]},
              "compression": [{"algorithm": "filter_pruning",
                               "params": {"schedule": "exponential", "pruning_target": 0.5, "pruning_steps": 2}},
                              {"algorithm": "quantization", "weights": {"bits": 4}}]}
    controller, q = lowbit.create_compressed_model(model, config, dataset=lowbit.Dataset([x[i:i + 2] for i in
                                                                                           range(0, 16, 2)]))
    train_epochs(q, controller, x)
    with torch.no_grad():
        out = q(x).numpy()
    plain = controller.strip()
    shapes = {k: tuple(v.shape[:2]) for k, v in plain.state_dict().items() if "grouped.0.weight" in k}
    assert shapes == {"block1.grouped.0.weight": (8, 2), "block2.grouped.0.weight": (16, 2)}
    with torch.no_grad():
        np.testing.assert_allclose(plain(x).numpy(), out, atol=1e-5)
    proto = onnx.load(str(controller.export_model(tmp_path / "pq.onnx")))
    exported = run_onnx(proto, {proto.graph.input[0].name: x.numpy()})[0]
    assert 10 * np.log10(np.sum(out.astype(np.float64) ** 2) / np.sum((out - exported) ** 2)) > 35


def test_a_transformers_regnet_prunes_its_grouped_convolutions_and_squeeze_excite_in_onnx_runtime_and_openvino():
    """RegNet-Y from its transformers config (a model lowbit did not write): grouped 3x3 convolutions of group
    width 8 whose filters a squeeze-excite Mul scales. Each loses half its input channels and filters, evenly
    in every block, and the shrunk graph computes what zeroing the removed channels does."""
    import transformers as tf
    from zoo_models import LastHiddenState

    config = tf.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 2], groups_width=8, layer_type="y")
    torch.manual_seed(0)
    model, x = LastHiddenState(tf.RegNetModel(config), text=False).eval(), torch.randn(2, 3, 32, 32)
    graph = lowbit.lower(model, (x,))
    grouped = [n.name for n in graph if n.op_type == "Conv" and n.attrs["group"] > 1]
    _shrinks_to_what_zeroing_the_removed_channels_gives(graph, plan(graph, PruneSpec(0.5)), x, atol=1e-4,
                                                        openvino=True)
    shapes = {n.name: (n.input(1).const.shape[:2], n.attrs["group"]) for n in graph if n.name in grouped}
    assert sorted(shapes.values()) == [((8, 4), 2), ((16, 4), 4), ((16, 4), 4)]  # from (16, 8) and (32, 8) x 2
    assert graph.outputs[0].shape[1:] == (32, 4, 4)


def test_masks_on_a_grouped_conv_zero_each_blocks_own_input_channels_and_strip_to_the_shrunk_model():
    model, x = _resnext()
    masked = lowbit.prune(model, 0.5, mode="mask", example_inputs=(x,))
    weight = masked.state_dict()["block2.grouped.0.weight"]  # [32, 4, 3, 3]: 4 blocks of 8 filters reading 4
    reads = (weight.abs().sum((2, 3)) > 0).reshape(4, 8, 4)  # per block: which of its 4 inputs each filter reads
    for block in reads:
        kept = block[block.any(1)]  # the filters not masked: 4 of the block's 8, each reading the same 2 inputs
        assert kept.shape[0] == 4 and int(kept[0].sum()) == 2 and bool((kept == kept[0]).all())
    stripped, shrunk = lowbit.strip(masked), lowbit.prune(model, 0.5, example_inputs=(x,))
    assert {k: v.shape for k, v in stripped.state_dict().items()} == {k: v.shape for k, v in
                                                                      shrunk.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(stripped(x), masked(x), rtol=1e-5, atol=1e-5)


def _decoder():
    return _reference(Decoder)(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_a_decoder_prunes_through_its_transposed_convolutions_and_skip_concat():
    """ConvTranspose upsampling (weight [in, out, k, k]: filters along axis 1), with its BatchNorm, a depthwise
    ConvTranspose (its group follows its filters), a skip Concat and a grouped ConvTranspose (weight [2 * 6, 6]:
    each block's filters along axis 1, cut block by block): each group loses half its channels, evenly in the
    grouped one's 2 blocks, and the map of class scores keeps its shape."""
    model, x = _decoder()
    pruned = lowbit.prune(model, 0.5, example_inputs=(x,))
    weights = {k: tuple(v.shape) for k, v in pruned.state_dict().items() if k.endswith("weight")}
    assert weights == {"stem.0.weight": (8, 3, 3, 3), "stem.1.weight": (8,), "down.0.weight": (16, 8, 3, 3),
                       "down.1.weight": (16,), "up.0.weight": (16, 8, 2, 2), "up.1.weight": (8,),
                       "fuse.0.weight": (12, 16, 3, 3), "fuse.1.weight": (12,), "smooth.weight": (12, 1, 3, 3),
                       "project.weight": (6, 12, 1, 1), "mix.weight": (6, 3, 1, 1), "head.weight": (5, 6, 1, 1)}
    groups = {n.input(1).name: n.attrs.get("group", 1) for n in graph_of(pruned) if n.op_type == "ConvTranspose"}
    assert groups == {"up.0.weight": 1, "smooth.weight": 12, "mix.weight": 2}
    blocked = {row["layers"][0]: row["blocked"] for row in graph_of(pruned).meta["pruning"] if row["blocked"]}
    assert blocked == {"head": "they reach the graph output 'conv2d_4', whose shape is kept"}
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape == (2, 5, 8, 8)
    graph = lowbit.lower(model, (x,))
    pruned_out, zeroed_out = _pruned_and_zeroed(graph, x)
    torch.testing.assert_close(pruned_out, zeroed_out, rtol=1e-5, atol=1e-6)


def test_a_decoder_file_prunes_to_the_modules_counts_and_runs_in_onnx_runtime_and_openvino():
    """The same decoder as an ONNX file (BatchNorms kept, as lowbit.export writes it) loses the same filters and
    BatchNorm channels as the module, and computes what the pruned module does in both runtimes."""
    model, x = _decoder()
    from_torch = lowbit.prune(model, 0.5, example_inputs=(x,))
    from_onnx = lowbit.prune(lowbit.codegen(lowbit.lower(model, (x,)), "onnx"), 0.5)
    shapes = {i.name: tuple(i.dims) for i in from_onnx.graph.initializer if i.name.endswith("weight")}
    assert shapes == {k: tuple(v.shape) for k, v in from_torch.state_dict().items() if k.endswith("weight")}
    with torch.no_grad():
        expected = from_torch(x).numpy()
    np.testing.assert_allclose(run_onnx(from_onnx, {from_onnx.graph.input[0].name: x.numpy()})[0], expected,
                               rtol=1e-4, atol=1e-5)
    xml = lowbit.codegen(lowbit.lower(from_onnx), "openvino")
    np.testing.assert_allclose(run_openvino(xml, [x.numpy()])[0], expected, rtol=1e-4, atol=1e-4)


class _GatedMLP(torch.nn.Module):
    """Phi-3's MLP: one Linear makes the gate and the up projection, chunked in two, silu(gate) * up, down."""

    def __init__(self):
        super().__init__()
        self.gate_up, self.down, self.head = torch.nn.Linear(8, 32), torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.head(x + self.down(torch.nn.functional.silu(gate) * up))


class _SlicedConv(torch.nn.Module):
    """A conv's channels cut by Slices into two branches of different widths, added back."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 12, 3, padding=1)
        self.a, self.b = torch.nn.Conv2d(4, 6, 1), torch.nn.Conv2d(8, 6, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.a(y[:, :4]) + self.b(y[:, 4:])


@pytest.mark.parametrize("make, x, shapes", [
    (_GatedMLP, (2, 5, 8), {"gate_up.weight": (16, 8), "down.weight": (8, 8), "head.weight": (4, 8)}),
    (_SlicedConv, (2, 3, 8, 8), {"conv.weight": (6, 3, 3, 3), "a.weight": (6, 2, 1, 1), "b.weight": (6, 4, 1, 1)}),
], ids=["split", "slice"])
def test_a_split_or_slice_of_the_channel_axis_prunes_each_part_and_follows_with_its_sizes(make, x, shapes):
    """A Split or Slice of the channel axis sends each part of a layer's filters to other readers: each part is a
    group of its own (the chunked gate and up are tied again by their product, so channel i goes from both
    halves), and the Split's sizes and the Slices' bounds follow the cut. They blocked the whole layer before.
    From torch and from the ONNX file alike; both runtimes compute what the pruned module does; masks strip to it."""
    from lowbit.pruning import cost

    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(*x)
    pruned = lowbit.prune(model, 0.5, example_inputs=(x,))
    assert {k: tuple(v.shape) for k, v in pruned.state_dict().items() if k in shapes} == shapes
    from_onnx = lowbit.prune(lowbit.codegen(lowbit.lower(model, (x,)), "onnx"), 0.5)
    params = cost(graph_of(pruned)).params
    assert cost(lowbit.lower(from_onnx)).params == params < cost(lowbit.lower(model, (x,))).params
    with torch.no_grad():
        expected = pruned(x).numpy()
    np.testing.assert_allclose(run_onnx(from_onnx, {from_onnx.graph.input[0].name: x.numpy()})[0], expected,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run_openvino(lowbit.codegen(graph_of(pruned), "openvino"), [x.numpy()])[0],
                               expected, rtol=1e-4, atol=1e-4)
    masked = lowbit.prune(model, 0.5, mode="mask", example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(lowbit.strip(masked)(x), masked(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(masked(x), torch.from_numpy(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet18", "densenet"])
def test_a_zero_ratio_is_the_identity(name):
    model, x = _model(name)
    same = lowbit.prune(model, 0.0, example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(same(x), model(x))
    assert all(row["kept"] == row["channels"] for row in graph_of(same).meta["pruning"])


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet", "vit"])
def test_onnx_models_prune_to_the_same_counts_and_run_in_onnx_runtime_and_openvino(name):
    model, x = _model(name)
    from_torch = lowbit.prune(model, 0.5, example_inputs=(x,))
    fp32 = lowbit.codegen(lowbit.lower(model, (x,)), "onnx")
    from_onnx = lowbit.prune(fp32, 0.5)
    assert isinstance(from_onnx, onnx.ModelProto)
    counts = {i.name: tuple(i.dims) for i in from_onnx.graph.initializer}
    assert {k: tuple(v.shape) for k, v in from_torch.state_dict().items() if k in counts} == {
        k: v for k, v in counts.items() if k in from_torch.state_dict()}
    assert sum(np.prod(i.dims) for i in from_onnx.graph.initializer) < sum(
        np.prod(i.dims) for i in fp32.graph.initializer)
    with torch.no_grad():
        expected = from_torch(x).numpy()
    name_in = from_onnx.graph.input[0].name
    np.testing.assert_allclose(run_onnx(from_onnx, {name_in: x.numpy()})[0], expected, rtol=1e-4, atol=1e-5)
    xml = lowbit.codegen(lowbit.lower(from_onnx), "openvino")
    np.testing.assert_allclose(run_openvino(xml, [x.numpy()])[0], expected, rtol=1e-4, atol=1e-4)


def test_round_to_keeps_channel_counts_multiples_of_it():
    model, x = _model("resnet18")
    pruned = lowbit.prune(model, 0.3, round_to=8, example_inputs=(x,))
    layers = _layers(graph_of(pruned))
    assert layers["conv1"][0] == 48  # floor(64 * 0.7) = 44 kept, rounded up to 48
    assert layers["layer4.0.conv1"][0] == 360  # floor(512 * 0.7) = 358 -> 360
    assert all(out % 8 == 0 for name, (out, _) in layers.items() if name != "fc")


def test_config_list_sets_ratios_per_layer_excludes_and_names_what_matches_nothing():
    model, x = _model("resnet18")
    config = [{"sparsity": 0.5, "op_types": ["Conv2d"]},
              {"sparsity": 0.25, "op_names": ["layer4.0.conv1"]},
              {"exclude": True, "op_names": ["layer3.1.conv1"]}]
    layers = _layers(graph_of(lowbit.prune(model, config_list=config, example_inputs=(x,))))
    assert layers["layer4.0.conv1"][0] == 384 and layers["layer3.1.conv1"][0] == 256
    assert layers["layer3.0.conv1"][0] == 128
    with pytest.raises(lowbit.PruneError, match=r"config_list\[0\].*matches no layer.*closest names: layer4.0.conv1"):
        lowbit.prune(model, config_list=[{"sparsity": 0.5, "op_names": ["layer4.0.conv"]}], example_inputs=(x,))


def test_ignored_scope_keeps_a_layers_filters():
    model, x = _model("resnet18")
    kept = lowbit.prune(model, 0.5, ignored_scope=lowbit.IgnoredScope(names=["conv2d_1"]), example_inputs=(x,))
    report = graph_of(kept).meta["pruning"]
    assert any(row["layers"] == ["layer1.0.conv1"] and "excluded" in row["blocked"] for row in report)
    assert _layers(graph_of(kept))["layer1.0.conv1"][0] == 64


def test_bn_scale_removes_the_channels_with_the_smallest_gammas():
    model, x = _model("se")
    graph = lowbit.lower(model, (x,))
    bn = next(n for n in graph if n.op_type == "BatchNormalization")
    gamma = np.array(bn.input(1).const)
    gamma[[0, 3, 5]] = 1e-4
    bn.input(1).const = gamma
    chosen = plan(graph, PruneSpec(3 / gamma.size, criterion="bn_scale"))
    group = next(g for g in chosen.groups.groups() if any(m.node is bn for m in g.members))
    assert chosen.removed[group.id].tolist() == [0, 3, 5]


def test_taylor_removes_the_channels_nothing_downstream_reads():
    """Channels whose readers' weights are zero get no gradient, so |w * dL/dw| is 0 on every member: Taylor
    removes exactly them (the L2 norm of their filters says nothing about it)."""
    model, x = _model("se")
    graph = lowbit.lower(model, (x,))
    bn = next(n for n in graph if n.op_type == "BatchNormalization")
    group = next(g for g in plan(graph, PruneSpec(0.0)).groups.groups() if any(m.node is bn for m in g.members))
    dead = np.array([1, 4])
    for m in group.members:
        if m.role == "in":
            array = np.array(m.value.const)
            index = [slice(None)] * array.ndim
            index[m.axis] = dead
            array[tuple(index)] = 0
            m.value.const = array
    chosen = plan(graph, PruneSpec(2 / group.size, criterion="taylor"),
                  lowbit.Dataset([x[:1], x[1:], x[:1] * 2]))
    group = next(g for g in chosen.groups.groups() if any(m.node is bn for m in g.members))
    assert chosen.removed[group.id].tolist() == dead.tolist()


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_norms_are_float64_sums_of_exact_terms_along_any_axis(axis):
    """The fast sums (einsum for squares, a float64 accumulator for the rest) are those of the float64 copy they
    replaced: the ranking of near-equal filters cannot depend on float32 rounding."""
    from lowbit.pruning.criteria import _per_channel

    w = np.random.default_rng(0).standard_normal((24, 16, 3, 3)).astype(np.float32) * 1e-3
    others = tuple(i for i in range(4) if i != axis % 4)
    for ufunc in (np.square, np.abs, np.positive):
        got = _per_channel(w, axis, ufunc)
        assert got.dtype == np.float64 and got.shape == (w.shape[axis],)
        np.testing.assert_allclose(got, ufunc(w.astype(np.float64)).sum(axis=others), rtol=1e-13, atol=0)


@pytest.mark.parametrize("criterion", ["l1", "l2", "geometric_median", "bn_scale", "taylor"])
def test_every_criterion_gives_a_model_that_runs(criterion):
    model, x = _model("mobilenet_v2")
    pruned = lowbit.prune(model, 0.5, criterion=criterion, example_inputs=(x,), dataset=lowbit.Dataset([x]))
    with torch.no_grad():
        assert torch.isfinite(pruned(x)).all()


def test_the_vit_prunes_whole_heads_and_leaves_only_the_classifier():
    model, x = _model("vit")
    report = graph_of(lowbit.prune(model, 0.5, example_inputs=(x,))).meta["pruning"]
    assert [row["layers"] for row in report if row["blocked"]] == [["head"]]
    heads = [row for row in report if row["layers"][0].endswith("attn.qkv")]
    assert [(row["channels"], row["kept"]) for row in heads] == [(4, 2), (4, 2)]  # 4 heads -> 2, per block


def _shrinks_to_what_zeroing_the_removed_channels_gives(graph, chosen, x, atol: float, openvino: bool = False):
    """Zero the weight entries that read the channels `chosen` removes (the output projection's rows, for heads)
    and run that; then shrink `graph`: it verifies and computes what the zeroed one did, in ONNX Runtime (and
    OpenVINO)."""
    _zero_what_reads_removed_channels(chosen)
    feeds = {graph.inputs[0].name: x.numpy()}
    zeroed = run_onnx(lowbit.codegen(graph, "onnx"), feeds)[0]
    shrink(graph, chosen.groups, chosen.removed)
    graph.verify()
    np.testing.assert_allclose(run_onnx(lowbit.codegen(graph, "onnx"), feeds)[0], zeroed, rtol=1e-5, atol=atol)
    if openvino:
        np.testing.assert_allclose(run_openvino(lowbit.codegen(graph, "openvino"), [x.numpy()])[0], zeroed,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("origin", ["torch", "onnx"])
def test_only_the_removed_heads_change_the_output(origin):
    """With the width and the MLPs excluded, only heads go: zero the output projection's rows that read the heads
    about to be removed, and the pruned model computes what the zeroed one does. From ONNX the attention is
    MatMul/Softmax/MatMul, found as well."""
    model, x = _model("vit")
    graph = lowbit.lower(model, (x,))
    if origin == "onnx":
        graph = lowbit.lower(lowbit.codegen(graph, "onnx"))
    exclude = ({"exclude": True, "op_names": ["patch_embed", "blocks.0.mlp.0", "blocks.1.mlp.0"]},)
    chosen = plan(graph, PruneSpec(0.5, config_list=exclude))
    pruned = [row for row in chosen.report if row["kept"] < row["channels"]]
    assert [(row["channels"], row["kept"]) for row in pruned] == [(4, 2), (4, 2)]
    _shrinks_to_what_zeroing_the_removed_channels_gives(graph, chosen, x, atol=1e-6)
    assert next(v for v in graph.constants.values() if "qkv" in v.name and v.const.ndim == 2).const.shape[1] == 48


def test_prune_filters_runs_inside_a_pipeline_and_the_users_model_is_untouched():
    model, x = _model("resnet18")
    before = copy.deepcopy(model.state_dict())
    pruned = lowbit.compile(model, passes=["cleanup", "prune_filters", "fold_bn"], example_inputs=(x,),
                            pruning={"ratio": 0.5})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _layers(graph_of(pruned))["conv1"][0] == 32
    assert not any(n.op_type == "BatchNormalization" for n in graph_of(pruned))


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 1.0}, r"ratio=1.0 is not in \[0, 1\)"),
    ({"ratio": -0.1}, r"ratio=-0.1 is not in \[0, 1\)"),
    ({"criterion": "l3"}, r"unknown criterion 'l3'.*l1, l2, geometric_median, bn_scale, taylor"),
    ({"criterion": "taylor"}, r"criterion 'taylor' needs data to take gradients on: pass dataset="),
    ({"round_to": 0}, r"round_to=0 must be a positive int"),
    ({"mode": "masks"}, r"mode='masks': use 'shrink'.*or 'mask'"),
    ({"config_list": {"sparsity": 0.5}}, r"config_list is a dict: pass a list of dicts"),
    ({"config_list": [{"sparsity": 0.5, "op_type": ["Conv2d"]}]}, r"unknown keys \['op_type'\]"),
])
def test_bad_requests_are_named_prune_errors(kwargs, message):
    model, x = _model("se")
    with pytest.raises(lowbit.PruneError, match=message):
        lowbit.prune(model, example_inputs=(x,), **kwargs)


def test_an_already_quantized_model_is_refused():
    model, x = _model("se")
    q = lowbit.quantize(model, lowbit.Dataset([x]))
    with pytest.raises(lowbit.PruneError, match="already quantized.*prune the FP32 model"):
        lowbit.prune(q, 0.5, example_inputs=(x,))


def test_a_pruned_model_saves_and_loads_bit_equal_on_the_original(tmp_path):
    model, x = _model("densenet")
    pruned = lowbit.prune(model, 0.5, example_inputs=(x,))
    path = lowbit.save(pruned, tmp_path / "pruned")
    loaded = lowbit.load(_model("densenet")[0], path, example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}


def test_cost_counts_resnet18s_published_macs_and_pruning_cuts_them():
    from lowbit.pruning import cost
    from models import resnet18

    model, x = resnet18(num_classes=1000).eval(), torch.randn(1, 3, 224, 224)
    before = cost(lowbit.lower(model, (x,)))
    assert before.macs == 1_814_073_344 and before.unknown == 0  # torchvision's 1.81 GMACs
    assert before.params == sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for name, b in model.named_buffers() if "running" in name)
    after = cost(graph_of(lowbit.prune(model, 0.5, example_inputs=(x,))))
    assert after.macs < 0.3 * before.macs and after.params < 0.3 * before.params


def test_masks_stay_zero_through_training_grow_on_the_schedule_and_strip_to_the_shrunk_model():
    import torch.nn.functional as F

    model, _ = _model("resnet18")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    masked = lowbit.prune(model, 0.5, mode="mask", example_inputs=(x[:2],),
                          schedule={"initial": 0.0, "steps": 3, "kind": "agp", "unit": "epochs"})
    controller = masked.lowbit_pruning
    assert controller.ratio == 0.0 and not any((~keep).any() for keep in controller.masks.values())
    opt = torch.optim.SGD(masked.parameters(), lr=0.05, momentum=0.9)  # momentum would revive zeroed weights
    masked.train()
    counts = []
    for _ in range(3):
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(masked(x), torch.arange(8) % 10).backward()
            opt.step()
            controller.step()  # counted in epochs: no effect
        controller.epoch_step()
        counts.append(int((~controller.masks["conv1"]).sum()))
    # agp: ratio 0.5 + (0 - 0.5) * (1 - t/3)^3; 64 channels keep floor(64 * (1 - ratio)): 41, 33, 32
    assert counts == [64 - math.floor(64 * (0.5 + 0.5 * (1 - t / 3) ** 3)) for t in (1, 2, 3)] == [23, 31, 32]
    masked.eval()
    with torch.no_grad():
        y = masked(x)
    gone = np.flatnonzero(~controller.masks["conv1"])
    assert torch.count_nonzero(masked.get_parameter("conv1.weight")[gone]) == 0
    assert torch.count_nonzero(masked.get_parameter("bn1.weight")[gone]) == 0
    stripped = lowbit.strip(masked)
    assert sum(p.numel() for p in stripped.parameters()) == sum(
        p.numel() for p in lowbit.prune(model, 0.5, example_inputs=(x[:2],)).parameters())
    with torch.no_grad():
        torch.testing.assert_close(stripped(x), y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))


class _NormedMLP(torch.nn.Module):
    """A ConvNeXt-style channel MLP: fc1's filters are normalized by a LayerNorm over them, then fc2 reads them."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.norm(self.fc1(x))))


def test_masks_on_a_layernormed_group_normalize_over_the_kept_channels_and_strip_to_the_same_outputs():
    """A LayerNorm over pruned channels: zeroing its masked channels leaves its mean and variance counting them,
    which the stripped module's do not (ConvNeXt and Swin came out 10 dB from their masked modules). While
    channels are masked its call normalizes over the kept ones; with none masked it is torch's own again."""
    from lowbit.pruning.masks import masked_layer_norm

    torch.manual_seed(0)
    model = _NormedMLP().eval()
    x = torch.randn(32, 8)
    masked = lowbit.prune(model, 0.5, mode="mask", example_inputs=(x[:2],),
                          schedule={"initial": 0.0, "steps": 2, "kind": "linear"})
    calls = lambda: {n.target for n in masked.graph.nodes if n.op == "call_function"}  # noqa: E731
    assert masked_layer_norm not in calls() and torch.ops.aten.layer_norm.default in calls()
    opt = torch.optim.Adam(masked.parameters(), lr=1e-2)
    masked.train()
    for _ in range(2):
        opt.zero_grad()
        masked(x).pow(2).mean().backward()
        opt.step()
        masked.lowbit_pruning.step()
    assert masked_layer_norm in calls() and torch.ops.aten.layer_norm.default not in calls()
    masked.eval()
    stripped = lowbit.strip(masked)
    assert stripped.get_parameter("norm.weight").shape == (8,)
    with torch.no_grad():
        y = masked(x)
        torch.testing.assert_close(stripped(x), y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))


@pytest.mark.parametrize("call, message", [
    (lambda m, x: lowbit.prune(lowbit.codegen(lowbit.lower(m, (x,)), "onnx"), mode="mask"),
     "mode='mask' needs a torch model"),
    (lambda m, x: lowbit.prune(m, mode="mask", schedule={"kind": "cubic"}, example_inputs=(x,)),
     "unknown schedule 'cubic': use one of agp, linear"),
    (lambda m, x: lowbit.prune(m, mode="mask", schedule={"final": 0.9}, example_inputs=(x,)),
     r"unknown schedule keys \['final'\]"),
    (lambda m, x: lowbit.prune(m, 0.3, mode="mask", schedule={"initial": 0.5}, example_inputs=(x,)),
     "initial=0.5 is above final=0.3"),
    (lambda m, x: lowbit.prune(m, schedule={"steps": 3}, example_inputs=(x,)), "pass mode='mask' with it"),
    (lambda m, x: lowbit.strip(lowbit.prune(m, 0.5, example_inputs=(x,))), "has neither pruning masks nor quant"),
    (lambda m, x: lowbit.prune(m, mode="mask", criterion="taylor", example_inputs=(x,)), "Taylor importance needs"),
])
def test_bad_mask_requests_are_named(call, message):
    model, x = _model("se")
    with pytest.raises(lowbit.PruneError, match=message):
        call(model, x)


def test_masks_and_their_schedule_are_saved_and_resume_after_load(tmp_path):
    model, x = _model("resnet18")
    masked = lowbit.prune(model, 0.5, mode="mask", example_inputs=(x,),
                          schedule={"initial": 0.0, "steps": 4, "kind": "linear", "unit": "steps"})
    masked.lowbit_pruning.step()  # ratio 0.125
    path = lowbit.save(masked, tmp_path / "masked")
    loaded = lowbit.load(_model("resnet18")[0], path, example_inputs=(x,))
    restored = loaded.lowbit_pruning
    assert restored.t == 1 and restored.ratio == 0.125
    assert all(np.array_equal(restored.masks[k], v) for k, v in masked.lowbit_pruning.masks.items())
    with torch.no_grad():
        assert torch.equal(loaded(x), masked(x))
    restored.step()
    masked.lowbit_pruning.step()  # both at 0.25 now, scored on the same weights
    assert all(np.array_equal(restored.masks[k], v) for k, v in masked.lowbit_pruning.masks.items())
    assert sum(p.numel() for p in lowbit.strip(loaded).parameters()) == sum(
        p.numel() for p in lowbit.strip(masked).parameters())


def test_the_vit_loses_half_its_width_mlp_channels_and_heads():
    model, x = _model("vit")
    pruned = lowbit.prune(model, 0.5, example_inputs=(x,))
    shapes = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    assert shapes["patch_embed.weight"] == (16, 1, 2, 2)  # the residual width: 32 -> 16
    assert shapes["cls_token"] == (1, 1, 16) and shapes["pos_embed"] == (1, 17, 16)
    for b in (0, 1):
        assert shapes[f"blocks.{b}.norm1.weight"] == (16,)
        assert shapes[f"blocks.{b}.attn.qkv.weight"] == (48, 16)  # q, k and v of 2 heads of 8, of 4
        assert shapes[f"blocks.{b}.attn.qkv.bias"] == (48,)
        assert shapes[f"blocks.{b}.attn.proj.weight"] == (16, 16)
        assert shapes[f"blocks.{b}.mlp.0.weight"] == (32, 16) and shapes[f"blocks.{b}.mlp.2.weight"] == (16, 32)
    assert shapes["head.weight"] == (10, 16)
    with torch.no_grad():
        assert pruned(x).shape == (2, 10)


def test_strip_returns_a_module_lowbit_did_not_make_unchanged_with_a_warning():
    model, _ = _model("se")
    with pytest.warns(UserWarning, match="holds nothing lowbit made; it is returned unchanged"):
        assert lowbit.strip(model) is model


def test_swins_stage_width_prunes_through_its_channels_last_window_padding():
    """Swin pads its [batch, height, width, channels] maps to whole windows (a Pad of nothing on the channel
    axis) and partitions them with Reshapes that keep the channels last: the first stage's width is one group
    through them, its patch merging (a Concat of four neighbours, LayerNorm, Linear) included. The last stage's
    width reaches the model output and stays; half the heads go, with their relative position biases."""
    from zoo_models import build

    module, make_input, _ = build("swin", "small")
    x = make_input(2)
    before = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    pruned = lowbit.prune(module, 0.5, example_inputs=(x,))
    after = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}

    def key(suffix):
        return next(k for k in before if k.endswith(suffix))

    embed = key("embeddings.patch_embeddings.projection.weight")
    assert before[embed][0] == 16 and after[embed] == (8,) + before[embed][1:]
    assert after[key("embeddings.norm.weight")] == (8,)
    merge = key("layers.0.downsample.reduction.weight")
    assert after[merge] == (32, 32)  # 4 neighbours x 16 -> 4 x 8 inputs; the last stage's 32 outputs stay
    assert after[key("layers.0.blocks.0.mlp.fc1.weight")] == (32, 8)
    for block in (0, 1):  # one head of two, read from the 8 channels kept, in the shifted-window block too
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert after[key(f"layers.0.blocks.{block}.attention.{proj}.weight")] == (8, 8)
        table = f"layers.0.blocks.{block}.attention.relative_position_bias.relative_position_bias_table"
        assert after[key(table)] == (49, 1)
    assert after[key("layers.1.blocks.0.mlp.fc1.weight")] == (64, 32)
    with torch.no_grad():  # LayerNorms normalize over the width, so the output changes: it runs, and agrees
        expected, unpruned = pruned(x).numpy(), module(x).numpy()
    written = lowbit.codegen(graph_of(pruned), "onnx")
    got = run_onnx(written, {written.graph.input[0].name: x.numpy()})[0]
    assert got.shape == expected.shape == unpruned.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("origin", ["torch", "onnx"])
def test_swins_heads_go_with_their_rows_of_the_relative_position_bias_table(origin):
    """Swin adds a relative position bias per head to each attention's scores, gathered from a table [positions,
    heads], and in its shifted-window blocks a window mask that is the same for every head: a head goes with
    its column of the table. With the widths and MLPs excluded, only heads go; zero the output projection's rows
    that read them, and the pruned model computes what the zeroed one does."""
    from zoo_models import build

    module, make_input, _ = build("swin", "small")
    x = make_input(2)
    graph = lowbit.lower(module, (x,))
    if origin == "onnx":
        graph = lowbit.lower(lowbit.codegen(graph, "onnx"))
    layers = ["embeddings.patch_embeddings.projection", "encoder.layers.0.blocks.0.mlp.fc1",
              "encoder.layers.0.blocks.1.mlp.fc1", "encoder.layers.1.blocks.0.mlp.fc1"]
    exclude = ({"exclude": True, "op_names": [f"model.{name}" for name in layers]},)
    chosen = plan(graph, PruneSpec(0.5, config_list=exclude))
    pruned = [row for row in chosen.report if row["kept"] < row["channels"]]
    assert [(row["channels"], row["kept"]) for row in pruned] == [(2, 1)] * 3
    tables = [v for v in graph.constants.values() if v.name.endswith("relative_position_bias_table")]
    assert len(tables) == 3 and all(t.const.shape == (49, 2) for t in tables)
    _shrinks_to_what_zeroing_the_removed_channels_gives(graph, chosen, x, atol=1e-6)
    assert all(t.const.shape == (49, 1) for t in tables)


def test_heads_read_by_a_per_head_term_lowbit_cannot_cut_stay_and_the_report_says_why():
    class Biased(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.out = (torch.nn.Linear(16, 16) for _ in range(4))
            self.bias = torch.nn.Parameter(torch.randn(2, 6, 6))

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = (p(x).reshape(b, n, 2, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.tanh(self.bias)[None])
            return self.out(y.transpose(1, 2).reshape(b, n, 16))

    model = Biased()
    x = torch.randn(2, 6, 16)
    pruned = lowbit.prune(model, 0.5, example_inputs=(x,))
    assert pruned.get_submodule("q").weight.shape == (16, 16)  # both heads stay
    reasons = {r["blocked"] for r in graph_of(pruned).meta["pruning"] if r["blocked"]}
    assert any("adds a term per head" in r and "cannot follow to a constant" in r for r in reasons), reasons


def test_gpt2s_mlps_and_heads_prune_through_its_conv1d_reshapes_and_run_in_onnx_runtime():
    """GPT-2's Conv1D flattens [batch, tokens, channels] to [batch x tokens, channels] and back, spelling the
    channel count out in the Reshape's target: the channels stay whole on the last axis, and shrink rewrites it.
    Its fused c_attn is split into q, k and v by a Split: whole heads go from all three, the Split's sizes and
    every Reshape on the way shrink with them."""
    from zoo_models import build

    module, make_input, _ = build("gpt2", "small")
    x = make_input(2)
    before = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    pruned = lowbit.prune(module, 0.5, example_inputs=(x,))
    after = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    fc = next(k for k in before if k.endswith("h.0.mlp.c_fc.weight"))
    proj = fc.replace("c_fc", "c_proj")
    assert after[fc] == (before[fc][0], before[fc][1] // 2) and after[proj] == (before[proj][0] // 2, before[proj][1])
    attn = fc.replace("mlp.c_fc", "attn.c_attn")
    heads_out = attn.replace("c_attn", "c_proj")
    assert after[attn] == (before[attn][0], before[attn][1] // 2)  # q, k and v of half the heads
    assert after[attn.replace("weight", "bias")] == (before[attn][1] // 2,)
    assert after[heads_out] == (before[heads_out][0] // 2, before[heads_out][1])
    with torch.no_grad():
        expected = pruned(x).numpy()
    written = lowbit.codegen(graph_of(pruned), "onnx")
    got = run_onnx(written, {written.graph.input[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _small_decoder(family: str, use_cache: bool = False) -> torch.nn.Module:
    """transformers' `family` model of the zoo's small decoder shape (head_dim 8), as a tensor -> last hidden
    state module."""
    transformers = pytest.importorskip("transformers")
    from zoo_models import SMALL_DECODER, LastHiddenState

    config = getattr(transformers, f"{family}Config")(**SMALL_DECODER, head_dim=8, use_cache=use_cache)
    torch.manual_seed(0)
    # text=False: called as model(x), so that the config's use_cache decides, as when a user calls it
    return LastHiddenState(getattr(transformers, f"{family}Model")(config).eval(), text=False).eval()


@pytest.mark.parametrize("family,origin,use_cache", [
    ("Llama", "torch", False), ("Llama", "onnx", False), ("Llama", "torch", True), ("Qwen2", "torch", False),
    ("Mistral", "torch", False), ("Qwen3", "torch", True), ("Gemma2", "torch", False)])
def test_grouped_query_attention_loses_key_value_heads_with_the_query_heads_that_read_them(family, origin,
                                                                                           use_cache):
    """Llama, Qwen2 (biased projections), Mistral, Qwen3 (an RMSNorm of each query and key head) and Gemma-2 (eager
    attention: a soft cap on the scores, dropout after the Softmax): 4 query heads share 2 key/value heads
    (repeat_kv: an Unsqueeze, Expand and Reshape), and a rotary embedding (Slices, Neg, Concat, Mul, Add on
    head_dim) stands between each projection's split into heads and the attention; with
    the cache on, keys and values are also joined to the (empty) cache. A group is one key/value head with its 2
    query heads. With the MLPs excluded, only heads go: zero the output projection's rows that read the query
    heads about to be removed, and the pruned model computes what the zeroed one does, in ONNX Runtime and
    OpenVINO."""
    module = _small_decoder(family, use_cache)
    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    graph = lowbit.lower(module, (x,))
    if origin == "onnx":
        graph = lowbit.lower(lowbit.codegen(graph, "onnx"))
    mlps = [f"model.layers.{i}.mlp.{name}" for i in range(2) for name in ("gate_proj", "up_proj")]
    chosen = plan(graph, PruneSpec(0.5, config_list=({"exclude": True, "op_names": mlps},)))
    pruned = [(row["layers"], row["channels"], row["kept"]) for row in chosen.report if row["kept"] < row["channels"]]
    assert pruned == [([f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"], 2, 1) for i in range(2)]
    _shrinks_to_what_zeroing_the_removed_channels_gives(graph, chosen, x, atol=1e-5, openvino=True)
    widths = {name: v.const.shape for name, v in graph.constants.items() if "self_attn" in name and v.const.ndim == 2}
    assert sorted(widths.values()) == [(16, 32)] * 2 + [(32, 8)] * 4 + [(32, 16)] * 2  # o_proj; k, v; q (as [in, out])


def test_masks_zero_a_linear_layers_filters_in_the_modules_own_layout_and_strip_to_the_shrunk_decoder():
    """A Linear's weight is [out, in] in the module and [in, out] in the IR (its MatMul reads it transposed): the
    masks must zero the module's rows. Llama's MLP channels and grouped key/value heads, masked, trained and
    stripped, give the model lowbit.prune(mode="shrink") gives, computing what the masked one does."""
    module = _small_decoder("Llama")
    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    masked = lowbit.prune(module, 0.5, mode="mask", example_inputs=(x,))
    opt = torch.optim.SGD(masked.parameters(), lr=0.05, momentum=0.9)
    masked.train()
    for _ in range(2):
        opt.zero_grad()
        masked(x).pow(2).mean().backward()
        opt.step()
    masked.eval()
    with torch.no_grad():
        y = masked(x)
    gate = masked.get_parameter("model.layers.0.mlp.gate_proj.weight")
    k = masked.get_parameter("model.layers.0.self_attn.k_proj.weight")
    assert gate.shape == (64, 32) and (gate.abs().sum(1) == 0).sum() == 32 and (gate.abs().sum(0) == 0).sum() == 0
    assert k.shape == (16, 32) and (k.abs().sum(1) == 0).sum() == 8  # one of the two key/value heads of 8
    stripped = lowbit.strip(masked)
    shapes = {n: tuple(p.shape) for n, p in stripped.named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in lowbit.prune(module, 0.5, example_inputs=(x,)).named_parameters()}
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (16, 32)
    with torch.no_grad():
        torch.testing.assert_close(stripped(x), y, rtol=1e-5, atol=1e-5)


MHA_DECODERS = {  # family: (config, the MLP layers' names, the attention projections' names)
    "GPTNeoX": (dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
                "layers.{i}.mlp.dense_h_to_4h", ["layers.{i}.attention.query_key_value"]),
    "OPT": (dict(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                 word_embed_proj_dim=32), "decoder.layers.{i}.fc1",
            [f"decoder.layers.{{i}}.self_attn.{p}_proj" for p in "qkv"]),
}


@pytest.mark.parametrize("family", list(MHA_DECODERS))
def test_heads_prune_through_a_per_head_qkv_split_and_scaled_queries(family):
    """GPT-NeoX's fused projection gives each head its q, k and v side by side ([..., heads, 3 x head_dim], then a
    Split of the last dim) and rotates part of each; OPT scales its queries by a number after the projection. A
    head goes whole: zero the output projection's rows that read the heads about to be removed (the MLPs
    excluded), and the pruned model computes what the zeroed one does."""
    transformers = pytest.importorskip("transformers")
    from zoo_models import LastHiddenState

    config, mlp, attention = MHA_DECODERS[family]
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}Model")(getattr(transformers, f"{family}Config")(**config,
                                                                                            use_cache=False))
    module = LastHiddenState(model.eval(), text=False).eval()
    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    graph = lowbit.lower(module, (x,))
    mlps = [f"model.{mlp.format(i=i)}" for i in range(2)]
    chosen = plan(graph, PruneSpec(0.5, config_list=({"exclude": True, "op_names": mlps},)))
    pruned = [(row["layers"], row["channels"], row["kept"]) for row in chosen.report if row["kept"] < row["channels"]]
    assert pruned == [([f"model.{name.format(i=i)}" for name in attention], 4, 2) for i in range(2)]
    _shrinks_to_what_zeroing_the_removed_channels_gives(graph, chosen, x, atol=1e-5, openvino=True)


@pytest.mark.parametrize("origin", ["torch", "onnx"])
def test_t5s_heads_go_in_every_layer_at_once_with_their_column_of_the_shared_position_bias(origin):
    """T5 computes its relative position bias once, from a table [buckets, heads] gathered by computed buckets, and
    every layer's attention adds it to its scores (behind its own padding-mask Where): the same heads must go in
    every layer, with the table's column. One group spans both layers' q, k and v; with the MLPs excluded, zero
    the output projections' rows that read the heads about to go, and the pruned model computes what the zeroed
    one does."""
    from zoo_models import build

    module, make_input, _ = build("t5", "small")
    x = make_input(2)
    graph = lowbit.lower(module, (x,))
    if origin == "onnx":
        graph = lowbit.lower(lowbit.codegen(graph, "onnx"))
    mlps = [f"model.encoder.block.{i}.layer.1.DenseReluDense.wi" for i in range(2)]
    chosen = plan(graph, PruneSpec(0.5, config_list=({"exclude": True, "op_names": mlps},)))
    pruned = [(row["layers"], row["channels"], row["kept"]) for row in chosen.report if row["kept"] < row["channels"]]
    attention = [f"model.encoder.block.{i}.layer.0.SelfAttention.{p}" for i in range(2) for p in "qkv"]
    assert pruned == [(attention, 4, 2)]
    table = next(v for v in graph.constants.values() if v.name.endswith("relative_attention_bias.weight"))
    assert table.const.shape == (32, 4)
    _shrinks_to_what_zeroing_the_removed_channels_gives(graph, chosen, x, atol=1e-5, openvino=True)
    assert table.const.shape == (32, 2)


@pytest.mark.parametrize("origin", ["torch", "file"])
def test_mpnets_heads_go_with_their_column_of_a_position_bias_expanded_to_the_batch(origin):
    """MPNet computes its relative position bias once, from a table [buckets, heads], and expands it to the batch
    ([batch, heads, tokens, tokens]) before every layer adds it: the walk back from the scores passes the Expand
    (whose target keeps the heads dim: torch.onnx.export's file spells it as Where(Equal(sizes, -1), 1, sizes)),
    so the heads of both layers go together, with the table's column, where they all stayed. With the MLPs
    excluded, the pruned model computes what zeroing the output projections' rows that read those heads gives,
    in ONNX Runtime and OpenVINO."""
    transformers = pytest.importorskip("transformers")
    from zoo_models import LastHiddenState

    torch.manual_seed(0)
    config = transformers.MPNetConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4)
    module = LastHiddenState(transformers.MPNetModel(config).eval(), text=True).eval()
    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    if origin == "torch":
        graph = lowbit.lower(module, (x,))
    else:
        graph = lowbit.lower(lowbit.compile(_torch_onnx_export(module, x[:1]), ["cleanup"]))
    others = [r["layers"][0] for r in plan(graph, PruneSpec(0.5)).report if "attn" not in r["layers"][0]]
    chosen = plan(graph, PruneSpec(0.5, config_list=({"exclude": True, "op_names": others},)))
    pruned = [(len(r["layers"]), r["channels"], r["kept"]) for r in chosen.report if r["kept"] < r["channels"]]
    assert pruned == [(6, 4, 2)]
    table = [v for v in graph.constants.values() if v.name.endswith("relative_attention_bias.weight")]
    assert [t.const.shape for t in table] == ([(32, 4)] if origin == "torch" else [])
    _shrinks_to_what_zeroing_the_removed_channels_gives(graph, chosen, x, atol=1e-5, openvino=True)
    assert [t.const.shape for t in table] == ([(32, 2)] if origin == "torch" else [])


def test_beits_heads_go_with_their_columns_of_an_interpolated_position_bias_table():
    """BEiT reads each layer's bias table [positions + 3, heads] in two slices: the window's rows, interpolated to
    the image's size by a Resize whose output size reads the heads from the input's own Shape, and the class
    token's 3 rows, joined again by a Concat, gathered by index and permuted. The walk back follows both
    branches to the table, so each layer's heads go with the table's columns (4 -> 2), where they all stayed.
    With the other layers excluded, the pruned model computes what zeroing the output projections' rows that
    read those heads gives, in ONNX Runtime and OpenVINO."""
    transformers = pytest.importorskip("transformers")
    from zoo_models import LastHiddenState

    torch.manual_seed(0)
    config = transformers.BeitConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, use_relative_position_bias=True)
    module = LastHiddenState(transformers.BeitModel(config).eval(), text=False).eval()
    with torch.no_grad():  # the tables start at zero: random values make each head's column matter
        for layer in module.modules():
            if hasattr(layer, "relative_position_bias_table"):
                layer.relative_position_bias_table.normal_()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    graph = lowbit.lower(module, (x,))
    mlps = [f"model.layers.{i}.mlp.fc1" for i in range(2)]
    chosen = plan(graph, PruneSpec(0.5, config_list=({"exclude": True, "op_names": mlps},)))
    attention = [[f"model.layers.{i}.attention.{p}_proj" for p in "qkv"] for i in range(2)]
    pruned = [(row["layers"], row["channels"], row["kept"]) for row in chosen.report if row["kept"] < row["channels"]]
    assert pruned == [(names, 4, 2) for names in attention]
    tables = [v for v in graph.constants.values() if v.name.endswith("relative_position_bias_table")]
    assert [t.const.shape for t in tables] == [(52, 4)] * 2
    _shrinks_to_what_zeroing_the_removed_channels_gives(graph, chosen, x, atol=1e-5, openvino=True)
    assert [t.const.shape for t in tables] == [(52, 2)] * 2


def test_attentions_tied_by_a_shared_term_keep_their_heads_when_one_of_them_cannot_lose_any():
    """Two attentions add the same per-head term (a bias table's rows) to their scores, which ties their heads;
    the second also adds a term that something else reads (the model's output), so its heads stay. The first's
    must stay too, with the table whole: cutting only the first's heads would take the second's columns."""
    class SharedBias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(8))
            self.shared, self.own = (torch.nn.Parameter(torch.randn(11, 2)) for _ in range(2))
            self.register_buffer("index", torch.randint(0, 11, (6, 6), generator=torch.Generator().manual_seed(0)))

        def attend(self, x, first, *terms):
            b, n, _ = x.shape
            q, k, v = (p(x).reshape(b, n, 2, 8).transpose(1, 2) for p in self.proj[first:first + 3])
            scores = q @ k.transpose(-1, -2) * 0.35
            for t in terms:
                scores = scores + t
            y = torch.softmax(scores, dim=-1) @ v
            return self.proj[first + 3](y.transpose(1, 2).reshape(b, n, 16))

        def forward(self, x):
            shared, own = (t[self.index].permute(2, 0, 1)[None] for t in (self.shared, self.own))
            h = x + self.attend(x, 0, shared)
            return h + self.attend(h, 4, shared, own) + own.mean()

    model = SharedBias().eval()
    x = torch.randn(2, 6, 16)
    pruned = lowbit.prune(model, 0.5, example_inputs=(x,))
    assert [pruned.get_parameter(f"proj.{i}.weight").shape for i in (0, 4)] == [(16, 16), (16, 16)]
    assert pruned.get_parameter("shared").shape == (11, 2)
    reasons = {r["blocked"] for r in graph_of(pruned).meta["pruning"] if r["blocked"]}
    assert any("shares a term per head" in r for r in reasons), reasons
    with torch.no_grad():
        np.testing.assert_allclose(pruned(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)


def _torch_onnx_export(module: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    """`module` as torch.onnx.export (TorchScript) writes it, with a dynamic batch: what a user brings as an ONNX
    file."""
    import io

    buffer = io.BytesIO()
    torch.onnx.export(module, (x,), buffer, input_names=["x"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("name, heads", [("t5", [(3, 4, 2)] * 2), ("swin", [(3, 2, 1)] * 3)])
def test_heads_of_a_file_prune_where_the_exporter_folded_their_position_bias_into_one_shared_constant(name, heads):
    """torch.onnx.export computes T5's and Swin's relative position bias at export time ([1, heads, tokens, tokens],
    added to the scores) and stores equal ones once, for several layers. Such a constant is the per-head term
    itself, and each attention's heads go with their own cut of it: nothing ties them (T5's two layers, Swin's
    three blocks; a torch parameter would tie them, since one tensor trains). Before, their heads all stayed.
    Swin's shifted-window block adds its mask to that bias: the exporter's shape inference names the batch of
    those scores apart from q's, and cleanup proves the names equal (ir/infer.equal_dims). With every other
    layer excluded, the pruned file computes what zeroing the output projections' rows that read those heads
    gives, in ONNX Runtime and OpenVINO."""
    from zoo_models import build

    module, make_input, _ = build(name, "small")
    x = make_input(2)
    graph = lowbit.lower(lowbit.compile(_torch_onnx_export(module, x[:1]), ["cleanup"]))
    layers = [n.name for n in graph if n.op_type in ("MatMul", "Gemm", "Conv") and n.input(1).const is not None]
    others = [n for n in layers if "attention" not in n.lower()]
    chosen = plan(graph, PruneSpec(0.5, config_list=({"exclude": True, "op_names": others},)))
    assert [(len(r["layers"]), r["channels"], r["kept"]) for r in chosen.report if r["kept"] < r["channels"]] == heads
    _shrinks_to_what_zeroing_the_removed_channels_gives(graph, chosen, x, atol=1e-5, openvino=True)


def test_a_swin_file_loses_the_residual_width_its_torch_module_loses():
    """torch.onnx.export's Swin reads its width back with Shape after slicing the shifted windows (Slice ->
    Concat -> Shape -> Gather): cleanup knows those sizes statically (Slice's shape inferred, folding repeated
    until nothing changes), so the width of the first stage prunes as in the torch module (16 -> 8), where a
    Shape had kept it."""
    from zoo_models import build

    module, make_input, _ = build("swin", "small")
    x = make_input(2)
    torch_rows = {(r["channels"], r["kept"]) for r in plan(lowbit.lower(module, (x,)), PruneSpec(0.5)).report}
    # a copy: once torch.onnx.export (TorchScript) has run a Swin, torch.export fails to capture it (CaptureError)
    file = _torch_onnx_export(copy.deepcopy(module), x[:1])
    graph = lowbit.lower(lowbit.compile(file, ["cleanup"]))
    assert not [n.name for n in graph if n.op_type == "Shape" and n.output.users
                and all(u.op_type == "Gather" and u.input(1).const is not None and u.input(1).const.ndim == 0
                        and int(u.input(1).const) > 0 for u in n.output.users)]
    file_rows = {(r["channels"], r["kept"]) for r in plan(graph, PruneSpec(0.5)).report}
    assert (16, 8) in torch_rows and (16, 8) in file_rows
    pruned = lowbit.prune(file, 0.5)
    with torch.no_grad():
        assert run_onnx(pruned, {"x": x.numpy()})[0].shape == tuple(module(x).shape)


def _pruned_rows(graph, dead=()) -> list[tuple[int, int, int]]:
    """(members, channels, kept) of each group a 50% L2 plan of `graph` prunes, sorted; groups whose first layer
    and channel count are in `dead` left out."""
    return sorted((len(row["layers"]), row["channels"], row["kept"]) for row in plan(graph, PruneSpec(0.5)).report
                  if row["kept"] < row["channels"] and (row["layers"][0], row["channels"]) not in dead)


@pytest.mark.parametrize("exporter", ["torchscript", "default"])
@pytest.mark.parametrize("family", ["Bert", "Segformer"])
def test_a_file_torch_onnx_export_wrote_prunes_as_its_torch_module_does(family, exporter, tmp_path):
    """torch.onnx.export stores equal initializers once (the zero biases of every layer: one tensor that layers
    of different groups add), reads sizes with Shape (the batch for every view; `x.flatten(2)` as Reshape(x,
    [Shape(x)[0:2], -1])), splits heads by a target with a -1 ([batch, tokens, -1, head_dim]) and makes kT with
    one Transpose from the split, scaled after it. Each layer gets its own cut of a shared bias, and the file
    loses the same channels and heads as its torch module: BERT its heads and MLPs (its pooler is dead code in
    the file), Segformer a stage's width as well. The pruned file computes what the pruned module does, in ONNX
    Runtime and OpenVINO. So with its default exporter (dynamo=True), which makes kT through batch and heads
    merged into one dim (cleanup writes it as one Transpose) and guards the probabilities with
    Where(IsNaN(p), 0, p)."""
    transformers = pytest.importorskip("transformers")
    from zoo_models import LastHiddenState

    config = {"Bert": dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64),
              "Segformer": dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2])}[family]
    torch.manual_seed(0)
    module = getattr(transformers, f"{family}Model")(getattr(transformers, f"{family}Config")(**config))
    module = LastHiddenState(module.eval(), text=False).eval()
    x = torch.randint(0, 100, (2, 12)) if family == "Bert" else torch.randn(2, 3, 32, 32)
    if exporter == "default":
        pytest.importorskip("onnxscript")
        file = default_exported(module, x, tmp_path / "model.onnx")
    else:
        file = _torch_onnx_export(module, x[:1])
    dead = [("model.pooler.dense", 32)] if family == "Bert" else []
    rows = _pruned_rows(lowbit.lower(lowbit.compile(file, ["cleanup"])))
    assert rows == _pruned_rows(lowbit.lower(module, (x,)), dead)
    assert len(rows) == (4 if family == "Bert" else 5)
    with torch.no_grad():
        expected = lowbit.prune(module, 0.5, example_inputs=(x,))(x).numpy()
    pruned = lowbit.prune(file, 0.5)
    assert sum(np.prod(i.dims) for i in pruned.graph.initializer) < sum(np.prod(i.dims) for i in file.graph.initializer)
    feeds = {"x": x.numpy()}
    np.testing.assert_allclose(run_onnx(pruned, feeds)[0], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run_openvino(lowbit.codegen(lowbit.lower(pruned), "openvino"), [x.numpy()])[0],
                               expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_decoder_file_from_torchs_default_exporter_prunes_as_its_module_does(name, tmp_path):
    """Only torch.onnx.export's default exporter writes these (TorchScript fails on GPT-2's mask and on Llama's
    grouped-query attention), in its own forms: GPT-2's fused qkv cut by Split's `num_outputs` (no sizes input),
    its heads merged back with batch and tokens in one Reshape before the Conv1D ([b, t, h, d] -> [b x t, h x d]);
    Llama's keys repeated for the query heads (repeat_kv), then transposed and scaled. The file loses the heads
    and MLP channels its module does, and computes what the pruned module does, in ONNX Runtime and OpenVINO."""
    pytest.importorskip("onnxscript")
    from zoo_models import build

    module, make_input, _ = build(name, "small")
    x = make_input(2)
    file = default_exported(module, x, tmp_path / "model.onnx")
    rows = _pruned_rows(lowbit.lower(lowbit.compile(file, ["cleanup"])))
    assert rows == _pruned_rows(lowbit.lower(module, (x,)))
    assert rows == ([(1, 2, 1)] * 2 + [(1, 128, 64)] * 2 if name == "gpt2" else [(2, 64, 32)] * 2 + [(3, 2, 1)] * 2)
    with torch.no_grad():
        expected = lowbit.prune(module, 0.5, example_inputs=(x,))(x).numpy()
    pruned = lowbit.prune(file, 0.5)
    np.testing.assert_allclose(run_onnx(pruned, {"x": x.numpy()})[0], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run_openvino(lowbit.codegen(lowbit.lower(pruned), "openvino"), [x.numpy()])[0],
                               expected, rtol=1e-4, atol=1e-4)


def _split_file(opset: int) -> onnx.ModelProto:
    """MatMul -> Relu -> Split of its 24 channels in 8 and 16 -> two MatMuls added: the sizes an attribute before
    opset 13, an input from it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"w": (8, 24), "wa": (8, 4), "wb": (16, 4)}
    init = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in weights.items()]
    if opset < 13:
        split = helper.make_node("Split", ["y"], ["a", "b"], axis=1, split=[8, 16])
    else:
        init.append(numpy_helper.from_array(np.array([8, 16], np.int64), "sizes"))
        split = helper.make_node("Split", ["y", "sizes"], ["a", "b"], axis=1)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"]), split,
             helper.make_node("MatMul", ["a", "wa"], ["oa"]), helper.make_node("MatMul", ["b", "wb"], ["ob"]),
             helper.make_node("Add", ["oa", "ob"], ["out"])]
    graph = helper.make_graph(nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


def test_a_split_files_sizes_follow_the_cut_in_the_form_its_opset_takes():
    """Before opset 13 a Split's sizes are an attribute, from it an input: each file keeps its form, loses the
    same channels (8 -> 4 and 16 -> 8) and computes the same outputs."""
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    outputs = []
    for opset in (11, 13, 18):
        pruned = lowbit.prune(_split_file(opset), 0.5)
        onnx.checker.check_model(pruned)
        shapes = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
        split = next(n for n in pruned.graph.node if n.op_type == "Split")
        sizes = [list(a.ints) for a in split.attribute if a.name == "split"] if opset < 13 else \
            [onnx.numpy_helper.to_array(i).tolist() for i in pruned.graph.initializer if i.name == split.input[1]]
        assert (shapes["w"], shapes["wa"], shapes["wb"], sizes) == ((8, 12), (4, 4), (8, 4), [[4, 8]]), opset
        assert "sizes" not in shapes  # the sizes it read before are gone
        outputs.append(run_onnx(pruned, {"x": x})[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[0], outputs[2])
