"""torch -> IR -> torch is exact; torch -> IR -> ONNX/OpenVINO agrees with torch; the user's model is untouched."""

import copy

import numpy as np
import pytest
import torch
from conftest import run_onnx, run_openvino
from models import REFERENCE_MODELS
from op_models import OP_MODELS, ROUNDED, Opaque, Structured

import lowbit


def _leaves(x):
    return torch.utils._pytree.tree_leaves(x)


def _reference(name):
    factory, shape = REFERENCE_MODELS[name]
    return factory(), lambda b: (torch.randn(b, *shape[1:]),)


def _op_model(name):
    factory, inputs, _ = OP_MODELS[name]
    torch.manual_seed(0)
    return factory().eval(), inputs


CASES = [*(("ref", n) for n in REFERENCE_MODELS), *(("op", n) for n in OP_MODELS)]


def _case(kind, name):
    return _reference(name) if kind == "ref" else _op_model(name)


@pytest.fixture(scope="module")
def lowered():
    cache = {}

    def get(kind, name):
        if (kind, name) not in cache:
            model, inputs = _case(kind, name)
            cache[kind, name] = (model, inputs, lowbit.lower(model, inputs(2)))
        return cache[kind, name]
    return get


@pytest.mark.parametrize("kind,name", CASES)
def test_torch_round_trip_is_exact_at_any_batch(lowered, kind, name):
    model, inputs, graph = lowered(kind, name)
    graph.verify()
    module = lowbit.codegen(graph, "torch")
    assert isinstance(module, torch.fx.GraphModule)
    for batch in (1, 2, 5):
        x = inputs(batch)
        with torch.no_grad():
            want, got = _leaves(model(*x)), _leaves(module(*x))
        assert len(want) == len(got)
        for w, g in zip(want, got):
            if kind == "op" and name in ROUNDED:
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
                continue
            assert torch.equal(w, g), f"{name} at batch {batch}: max diff {(w - g).abs().max()}"


@pytest.mark.parametrize("name", list(OP_MODELS))
def test_op_models_lower_to_their_onnx_ops_without_opaque_nodes(lowered, name):
    _, _, graph = lowered("op", name)
    ops = {n.op_type for n in graph}
    assert OP_MODELS[name][2] <= ops, f"missing {OP_MODELS[name][2] - ops}"
    assert not [n for n in graph if n.domain], "every op of these models has an exact ONNX equivalent"


@pytest.mark.parametrize("kind,name", CASES)
def test_onnx_and_openvino_agree_with_torch(lowered, kind, name):
    model, inputs, graph = lowered(kind, name)
    x = inputs(3)
    with torch.no_grad():
        want = [w.numpy() for w in _leaves(model(*x))]
    feeds = {v.name: t.numpy() for v, t in zip(graph.inputs, x)}
    for w, g in zip(want, run_onnx(lowbit.codegen(graph, "onnx"), feeds)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    for w, g in zip(want, run_openvino(lowbit.codegen(graph, "openvino"), [t.numpy() for t in x])):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3)


def test_batch_dimension_stays_dynamic_in_every_backend(lowered):
    _, _, graph = lowered("ref", "resnet18")
    assert graph.inputs[0].shape == ("batch", 3, 32, 32)
    assert graph.outputs[0].shape == ("batch", 10)
    onnx_model = lowbit.codegen(graph, "onnx")
    dim0 = onnx_model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch" and not dim0.HasField("dim_value")
    ov_model = lowbit.codegen(graph, "openvino")
    assert ov_model.inputs[0].get_partial_shape()[0].is_dynamic
    assert ov_model.inputs[0].get_partial_shape()[1].get_length() == 3


def test_user_dynamic_dims_survive():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()
    ep = torch.export.export(model, (torch.randn(2, 7, 8),),
                             dynamic_shapes=({0: torch.export.Dim("b"), 1: torch.export.Dim("seq")},))
    graph = lowbit.lower(ep)
    assert isinstance(graph.inputs[0].shape[0], str) and isinstance(graph.inputs[0].shape[1], str)
    module = lowbit.codegen(graph, "torch")
    x = torch.randn(3, 11, 8)
    assert torch.equal(module(x), model(x))
    (out,) = run_onnx(lowbit.codegen(graph, "onnx"), {graph.inputs[0].name: x.numpy()})
    np.testing.assert_allclose(out, model(x).detach().numpy(), atol=1e-5)


def test_opaque_ops_survive_to_torch_and_are_refused_by_onnx():
    model = Opaque()
    with pytest.warns(UserWarning, match="no exact ONNX equivalent"):
        graph = lowbit.lower(model, (torch.randn(2, 5),))
    opaque = [n for n in graph if n.domain == "torch"]
    assert sorted(n.op_type for n in opaque) == ["aten::cummax.default", "aten::flip.default"]
    cummax = next(n for n in opaque if "cummax" in n.op_type)
    assert cummax.attrs["args"] == [{"$input": 0}, 1]
    x = torch.randn(4, 5)
    assert torch.equal(lowbit.codegen(graph, "torch")(x), model(x))
    with pytest.raises(lowbit.UnsupportedOpError, match=r"aten::cummax\.default.*codegen\(graph, 'torch'\)"):
        lowbit.codegen(graph, "onnx")
    with pytest.raises(lowbit.UnsupportedOpError, match="opaque"):
        lowbit.codegen(graph, "openvino")


def test_output_structure_is_kept():
    model = Structured()
    module = lowbit.codegen(lowbit.lower(model, (torch.randn(2, 3),)), "torch")
    x = torch.randn(4, 3)
    out = module(x)
    assert set(out) == {"double", "pair"} and isinstance(out["pair"], tuple)
    assert torch.equal(out["double"], x * 2) and torch.equal(out["pair"][1], x.relu())


def test_generated_module_has_the_original_parameter_names_and_trains():
    model, inputs = _reference("resnet18")
    module = lowbit.codegen(lowbit.lower(model, inputs(2)), "torch")
    assert set(module.state_dict()) == set(model.state_dict())  # BatchNorms are nn.BatchNorm2d again
    module.load_state_dict(model.state_dict())  # so the user's FP32 checkpoint loads, strictly
    params = dict(module.named_parameters())
    assert "conv1.weight" in params and "fc.weight" in params and params["fc.weight"].requires_grad
    module(inputs(2)[0]).sum().backward()
    assert params["conv1.weight"].grad is not None and params["conv1.weight"].grad.abs().sum() > 0


class _RotaryTable(torch.nn.Module):
    """Llama's and Phi-3's rotary frequencies, `inv_freq.to(x.device, torch.float32)` (aten.to.device: lowbit runs it
    once at lowering), and a buffer transposed (cleanup folds it): constants of the lowered graph, no weights."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.register_buffer("inv_freq", torch.arange(1, 5, dtype=torch.float32) / 4)
        self.register_buffer("table", torch.randn(4, 4))

    def forward(self, x):
        return self.fc(x) * self.inv_freq.to(x.device, torch.float32) + x @ self.table.t()


@pytest.mark.parametrize("passes", [[], ["cleanup"]])
def test_constants_computed_from_buffers_stay_buffers_and_train_nothing(passes):
    """What lowbit computes once from buffers and literals is a buffer of the generated module, not a parameter
    an optimizer would train: Llama's rotary frequencies were a trainable `to_3_value` in every
    QAT and pruned module (4 more parameters than the model), Phi-3's too."""
    model = _RotaryTable().eval()
    x = torch.randn(2, 4)
    module = lowbit.compile(model, passes, example_inputs=(x,))
    assert {name for name, _ in module.named_parameters()} == {"fc.weight", "fc.bias"}
    assert sum(b.numel() for b in module.buffers()) >= 4 + 16
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x))


def test_lowering_never_mutates_the_user_model():
    model, inputs = _reference("mobilenet_v2")
    model.train()  # a training-mode model is lowered with eval semantics, on a copy
    before = copy.deepcopy(model.state_dict())
    graph = lowbit.lower(model, inputs(2))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not [n for n in graph if n.domain], "eval-mode lowering has no training-only ops"
    model.eval()
    x = inputs(3)[0]
    with torch.no_grad():
        assert torch.equal(lowbit.codegen(graph, "torch")(x), model(x))


def test_graph_constants_do_not_alias_model_weights():
    model = torch.nn.Linear(4, 2).eval()
    graph = lowbit.lower(model, (torch.randn(2, 4),))
    weight = graph.constants["weight"]
    assert not weight.const.flags.writeable
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not np.array_equal(weight.const, model.weight.detach().numpy())


def test_exported_program_and_graph_module_inputs():
    model, inputs = _op_model("convs")
    ep = torch.export.export(model, inputs(2), dynamic_shapes=({0: torch.export.Dim("b")},))
    from_ep = lowbit.lower(ep)
    from_gm = lowbit.lower(ep.module())  # example inputs rebuilt from the placeholders
    assert [n.op_type for n in from_ep] == [n.op_type for n in from_gm]
    x = inputs(3)
    for graph in (from_ep, from_gm):
        assert torch.equal(lowbit.codegen(graph, "torch")(*x), model(*x))


def test_a_batch_of_one_still_gives_a_dynamic_batch():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(576, 3)).eval()
    graph = lowbit.lower(model, (torch.randn(1, 1, 14, 14),))
    assert graph.inputs[0].shape == ("batch", 1, 14, 14)
    x = torch.randn(7, 1, 14, 14)
    assert torch.equal(lowbit.codegen(graph, "torch")(x), model(x))


def test_generated_modules_keep_the_users_parameter_names():
    """A Sequential's parameters keep their names ("0.weight", not "c_0_weight"), so an FP32 checkpoint loads into
    the compiled module, and the quantized one adds only its quantizers' ranges."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(72, 3)).eval()
    x = torch.randn(2, 1, 8, 8)
    compiled = lowbit.compile(model, ["cleanup"], example_inputs=(x,))
    assert set(compiled.state_dict()) == set(model.state_dict())
    assert isinstance(compiled.get_submodule("1"), torch.nn.BatchNorm2d)
    fresh = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(72, 3)).eval()
    compiled.load_state_dict(fresh.state_dict())  # strict: the user's checkpoint, num_batches_tracked included
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), fresh(x))
    quantized = lowbit.quantize(model, lowbit.Dataset([x]))
    names = set(quantized.state_dict())
    assert {"0.weight", "0.bias", "4.weight", "4.bias"} <= names
    assert all(k in {"0.weight", "0.bias", "4.weight", "4.bias"} or k.endswith(("_fq.low", "_fq.high")) for k in names)


def test_batch_norm_in_a_generated_module_trains_as_the_users_did():
    """train() makes the generated BatchNorms normalize by batch statistics and update their running ones (fine-
    tuning after pruning, QAT), and graph_of reads the updated statistics back into the IR."""
    model, inputs = _reference("resnet18")
    module = lowbit.codegen(lowbit.lower(model, inputs(2)), "torch")
    x = inputs(4)[0]
    before = module.get_submodule("bn1").running_mean.clone()
    module.train()
    with torch.no_grad():
        module(x)
        model.train()(x)
    after = module.get_submodule("bn1").running_mean
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, model.bn1.running_mean)  # the user's module, trained the same way
    from lowbit.api import graph_of

    bn = next(n for n in graph_of(module) if n.op_type == "BatchNormalization")
    np.testing.assert_array_equal(bn.input(3).const, after.numpy())


def test_dropout_in_a_generated_module_drops_out_only_while_it_trains():
    model, inputs = _reference("mobilenet_v2")  # its classifier: Dropout(0.2) -> Linear
    module = lowbit.codegen(lowbit.lower(model, inputs(2)), "torch")
    assert [type(m).__name__ for _, m in module.named_modules() if isinstance(m, torch.nn.Dropout)] == ["Dropout"]
    assert module.get_submodule("dropout").p == 0.2
    x = inputs(4)[0]
    with torch.no_grad():
        assert not module.training and torch.equal(module(x), module(x))
        module.train()
        assert not torch.equal(module(x), module(x))


def test_a_scalar_constant_stays_a_scalar_in_the_generated_module():
    """0-d constants keep their rank as module tensors (a 0-d bool that became [1] changed an op's output rank)."""
    from lowbit.ir.graph import Graph

    graph = Graph("scalar")
    x = graph.add_input("x", "float32", (2, 3))
    flag = graph.add_constant("flag", np.array(True))
    graph.outputs += [graph.make_node("Relu", [x], name="relu").output,
                      graph.make_node("Identity", [flag], name="same").output]
    module = lowbit.codegen(graph, "torch")
    assert module.get_buffer("flag").shape == ()
    assert module(torch.ones(2, 3))[1].shape == ()
    from lowbit.api import graph_of

    assert graph_of(module).constants["flag"].const.shape == ()


def test_rsqrt_of_an_rms_norm_lowers_to_sqrt_then_reciprocal():
    """Llama's RMSNorm: ONNX has no Rsqrt; Sqrt then Reciprocal equals torch.rsqrt up to a rounding."""

    class RMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, 8))

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    model = RMSNorm().eval()
    graph = lowbit.lower(model, (torch.randn(2, 3, 8),))
    root = next(n for n in graph if n.op_type == "Reciprocal")
    assert root.input(0).producer.op_type == "Sqrt" and not [n for n in graph if n.domain]
    x = torch.randn(4, 3, 8)
    with torch.no_grad():
        want = model(x).numpy()
        np.testing.assert_allclose(lowbit.codegen(graph, "torch")(x).numpy(), want, rtol=1e-6, atol=1e-6)
    (got,) = run_onnx(lowbit.codegen(graph, "onnx"), {graph.inputs[0].name: x.numpy()})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    (got,) = run_openvino(lowbit.codegen(graph, "openvino"), [x.numpy()])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_weight_transposed_in_forward_is_the_constant_weight_of_a_layer():
    """Falcon multiplies by `self.weight.T` in forward: the MatMul reads the transposed weight as a constant (the
    module keeps its own layout), so it quantizes and prunes as a layer; before, it read a Transpose node and
    pruning found no group in Falcon at all. w.t(), w.transpose(0, 1) and w.permute(1, 0) are the same."""
    class TransposedInForward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8, 6))
            self.out = torch.nn.Parameter(torch.randn(4, 8))
            self.last = torch.nn.Parameter(torch.randn(4, 4))
            self.head = torch.nn.Parameter(torch.randn(2, 4))

        def forward(self, x):
            y = torch.relu(torch.relu(x @ self.weight.T) @ self.out.t()) @ self.last.transpose(0, 1)
            return y @ self.head.permute(1, 0)

    model = TransposedInForward().eval()
    x = torch.randn(3, 6)
    graph = lowbit.lower(model, (x,))
    matmuls = [n for n in graph if n.op_type == "MatMul"]
    assert [n.input(1).const.shape for n in matmuls] == [(6, 8), (8, 4), (4, 4), (4, 2)]
    assert all(n.input(1).meta["torch_transposed"] for n in matmuls)
    q = lowbit.quantize(model, lowbit.Dataset([torch.randn(3, 6) for _ in range(4)]))
    assert sum(n.op_type == "FakeQuantize" and n.input(0).const is not None for n in lowbit.api.graph_of(q)) == 4
    pruned = lowbit.prune(model, 0.5, example_inputs=(x,))
    assert dict((k, tuple(v.shape)) for k, v in pruned.named_parameters()) == {
        "weight": (4, 6), "out": (2, 4), "last": (2, 2), "head": (2, 2)}
    with torch.no_grad():
        np.testing.assert_allclose(lowbit.codegen(graph, "torch")(x).numpy(), model(x).numpy(), rtol=0, atol=0)
