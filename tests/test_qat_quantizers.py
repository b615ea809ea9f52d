"""QAT quantizers: 2 to 8 bits per weight or activation, per layer; ranges learned as range ends ("range") or as
an LSQ step size ("lsq"), valid and with zero on the grid while they train; exports in ONNX Runtime and
OpenVINO agree with the torch module before and after training; weight ranges clipped below 8 bits
(`weight_range_estimator`), on their grid once deployed."""

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import run_onnx, run_openvino
from deploy_checks import HOST_OVERFLOW_FIX
from models import REFERENCE_MODELS
from onnx import numpy_helper

import lowbit
from lowbit.backends.torch_fq import FakeQuantize, LSQFakeQuantize


def sqnr(reference, x) -> float:
    reference, x = np.asarray(reference, np.float64), np.asarray(x, np.float64)
    return float(10 * np.log10(np.sum(reference ** 2) / max(np.sum((reference - x) ** 2), 1e-30)))


@pytest.fixture(scope="module")
def se():
    factory, shape = REFERENCE_MODELS["se"]
    x = torch.randn(16, *shape[1:], generator=torch.Generator().manual_seed(3))
    return factory(), x


def _quantize(model, x, **kw):
    kw.setdefault("overflow_fix", HOST_OVERFLOW_FIX)  # compared with the runtimes' int8 kernels on this host
    return lowbit.quantize(model, lowbit.Dataset([x[i:i + 4] for i in range(0, len(x), 4)]), **kw)


def _levels_by_layer(q) -> dict[tuple[str, str], int]:
    """(layer, "weight" | "activation") -> levels of the quantizer of that layer's weight, or of its data input
    (found walking up through the ops a quantizer moves above, such as Flatten), from the module's graph."""
    found = {}
    for node in q.lowbit_graph:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        for port, kind in ((1, "weight"), (0, "activation")):
            v = node.input(port)
            while v.producer is not None and v.producer.op_type != "FakeQuantize":
                v = v.producer.input(0)
            if v.producer is not None:
                found[node.name, kind] = int(v.producer.attrs["levels"])
    return found


def test_bits_per_kind_and_per_layer(se):
    model, x = se
    q = _quantize(model, x, bits={"weights": 4, "activations": 6,
                                  "layers": {"conv2d": {"weights": 8}, "{re}^linear$": {"activations": 8}}})
    levels = _levels_by_layer(q)
    weights = {layer: n for (layer, kind), n in levels.items() if kind == "weight"}
    assert len(weights) == 9 and weights.pop("conv2d") == 255  # 8-bit narrow symmetric weights ([-127, 127])
    assert set(weights.values()) == {15}  # 4-bit ones ([-7, 7]) on every other layer
    assert levels["linear", "activation"] == 256  # the classifier's input at 8 bits
    others = {n for (layer, kind), n in levels.items() if kind == "activation" and layer != "linear"}
    assert others == {64}  # every other activation at 6 bits


def test_low_bit_exports_agree_with_the_torch_module(se, tmp_path):
    model, x = se
    q = _quantize(model, x, bits={"weights": 4, "activations": 4})
    assert {m.levels for m in q.modules() if isinstance(m, FakeQuantize)} == {15, 16}
    with torch.no_grad():
        simulated = q(x).numpy()
    onnx_model = lowbit.export(q, tmp_path / "q.onnx")
    import onnx

    proto = onnx.load(str(onnx_model))
    assert sum(n.op_type == "Clip" and n.name.endswith("_grid_clip") for n in proto.graph.node) > 0
    ort_out = run_onnx(proto, {proto.graph.input[0].name: x.numpy()})[0]
    import openvino as ov

    xml = lowbit.export(q, tmp_path / "q.xml")
    ov_out = run_openvino(ov.Core().read_model(str(xml)), [x.numpy()])[0]
    assert sqnr(simulated, ort_out) > 35 and sqnr(simulated, ov_out) > 35
    assert (simulated.argmax(1) == ort_out.argmax(1)).mean() == 1.0


@pytest.mark.parametrize("bad, message", [
    ({"weights": 9}, "bits['weights'] = 9: bits are an int from 2 to 8"),
    ({"weights": 1}, "from 2 to 8"),
    ({"wieghts": 4}, "unknown key 'wieghts'"),
    ({"layers": {"conv2": {"weights": 4}}}, "closest: conv2d"),
    ({"layers": {"conv2d": 4}}, "give a dict such as"),
    ("4", "bits is a str"),
])
def test_bad_bits_are_named(se, bad, message):
    model, x = se
    with pytest.raises(lowbit.OptionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _quantize(model, x, bits=bad)


def _train(q, x, steps=20, lr=1e-3):
    q = copy.deepcopy(q).train()
    target = torch.arange(len(x)) % 10
    opt = torch.optim.Adam(q.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(q(x), target).backward()
        opt.step()
    return q.eval()


def _assert_valid_grids(q):
    for m in q.modules():
        if isinstance(m, FakeQuantize):
            low, high = (t.detach().double() for t in m.ranges())
            assert torch.all(high > low)
            step = (high - low) / (m.levels - 1)
            zero_point = -low / step
            assert torch.allclose(zero_point, zero_point.round(), atol=1e-3), m  # zero is a level
            if m.grid == "symmetric":
                assert torch.equal(zero_point.round(), m.zero_point.double())  # and the one it was calibrated on


@pytest.mark.parametrize("learning", ["range", "lsq"])
@pytest.mark.parametrize("preset", ["performance", "mixed"])
def test_trained_ranges_stay_valid_and_export_agrees(se, learning, preset, tmp_path):
    model, x = se
    q = _quantize(model, x, range_learning=learning, preset=preset, bits={"weights": 4})
    kinds = {type(m) for m in q.modules() if isinstance(m, FakeQuantize)}
    assert kinds == {LSQFakeQuantize if learning == "lsq" else FakeQuantize}
    grids = {m.grid for m in q.modules() if isinstance(m, FakeQuantize)}
    assert grids == ({"symmetric"} if preset == "performance" else {"symmetric", "asymmetric"})
    before = {k: v.clone() for k, v in q.state_dict().items()}
    trained = _train(q, x)
    moved = [k for k, v in trained.state_dict().items() if k.endswith((".scale", ".high", ".offset"))
             and not torch.equal(v, before[k])]
    assert moved  # the ranges learned
    _assert_valid_grids(trained)
    with torch.no_grad():
        simulated = trained(x).numpy()
        assert sqnr(simulated, lowbit.strip(trained)(x).numpy()) > 100  # the exported grid is the one trained
    path = lowbit.export(trained, tmp_path / "t.onnx")
    import onnx

    proto = onnx.load(str(path))
    exported = run_onnx(proto, {proto.graph.input[0].name: x.numpy()})[0]
    assert sqnr(simulated, exported) > 35


def test_lsq_starts_where_the_range_quantizer_does(se):
    model, x = se
    ranged, lsq = _quantize(model, x), _quantize(model, x, range_learning="lsq")
    with torch.no_grad():
        assert sqnr(ranged(x).numpy(), lsq(x).numpy()) > 40


def test_lsq_scales_the_step_gradient():
    fq_range = FakeQuantize(16, torch.tensor(-8.0), torch.tensor(7.0), grid="symmetric")
    fq_lsq = LSQFakeQuantize(16, torch.tensor(-8.0), torch.tensor(7.0), grid="symmetric")
    x = torch.linspace(-10, 10, 400)
    fq_range(x).sum().backward()
    fq_lsq(x).sum().backward()
    assert torch.allclose(fq_range(x), fq_lsq(x))
    # d/d(step) of the same function is 7x d/d(high) (high = 7 steps); LSQ scales it by 1/sqrt(400 x 7)
    assert float(fq_lsq.scale.grad) == pytest.approx(float(fq_range.high.grad) * 7 / np.sqrt(400 * 7), rel=1e-4)


def test_an_inverted_range_is_repaired_not_nan():
    fq = FakeQuantize(256, torch.tensor(-1.0), torch.tensor(2.0), grid="asymmetric")
    with torch.no_grad():
        fq.high.fill_(-3.0)  # an optimizer step overshot past the low end
    low, high = (float(t.detach()) for t in fq.ranges())
    assert high - low == pytest.approx(2.0, rel=1e-6)  # the width between the ends, not a collapsed range
    assert low <= 0 <= high and torch.isfinite(fq(torch.randn(10))).all()


def test_the_learning_mode_survives_save_and_load(se, tmp_path):
    model, x = se
    q = _trained = _train(_quantize(model, x, range_learning="lsq", preset="mixed"), x, steps=5)
    lowbit.save(q, tmp_path / "lsq.state")
    back = lowbit.load(model, tmp_path / "lsq.state", example_inputs=(x[:2],))
    assert {type(m) for m in back.modules() if isinstance(m, FakeQuantize)} == {LSQFakeQuantize}
    with torch.no_grad():
        np.testing.assert_allclose(back(x).numpy(), _trained(x).numpy(), atol=1e-5)


def test_a_quantized_resnet18_deep_copies_and_trains_apart():
    factory, shape = REFERENCE_MODELS["resnet18"]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    q = lowbit.quantize(factory(), lowbit.Dataset([x]))
    twin = copy.deepcopy(q)  # was a RecursionError: Graph's default deepcopy walked the whole graph recursively
    assert twin.lowbit_graph is not q.lowbit_graph and len(twin.lowbit_graph.nodes) == len(q.lowbit_graph.nodes)
    with torch.no_grad():
        assert torch.equal(twin(x), q(x))
        twin.get_parameter(next(n for n, _ in twin.named_parameters() if n.endswith("weight"))).mul_(0)
        assert not torch.equal(twin(x), q(x))  # its own weights


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_qat_exports_run_as_int8_in_both_runtimes(weight_bits, tmp_path):
    """A trained QAT module exported: OpenVINO runs every conv and the classifier in u8/i8 (4-bit
    weights too: they are written already rounded, behind a 255-level weight quantizer of the same step) and ONNX
    Runtime's optimized graph has every conv as QLinearConv; both agree with the module."""
    import openvino as ov
    from deploy_checks import int8_count, openvino_layer_precisions, ort_optimized_ops

    factory, shape = REFERENCE_MODELS["resnet18"]
    x = torch.randn(8, *shape[1:], generator=torch.Generator().manual_seed(2))
    config = {"input_info": {"sample_size": [2, *shape[1:]]},
              "compression": {"algorithm": "quantization", "weights": {"bits": weight_bits}}}
    controller, q = lowbit.create_compressed_model(factory(), config, dataset=lowbit.Dataset([x]))
    opt = torch.optim.Adam(q.train().parameters(), lr=1e-3)
    for _ in range(2):  # the controller's module itself trains (what export_model writes)
        opt.zero_grad()
        F.cross_entropy(q(x), torch.arange(len(x)) % 10).backward()
        opt.step()
    q.eval()
    with torch.no_grad():
        simulated = q(x).numpy()
    xml, onnx_path = controller.export_model(tmp_path / "q.xml"), controller.export_model(tmp_path / "q.onnx")
    assert int8_count(openvino_layer_precisions(xml)) == 21  # 20 convolutions and the classifier
    assert ort_optimized_ops(onnx_path)["QLinearConv"] == 20
    assert sqnr(simulated, run_openvino(ov.Core().read_model(str(xml)), [x.numpy()])[0]) > 35


@pytest.mark.parametrize("name, hw", [("concat", "CPU"), ("se", "NPU")])
def test_unified_scale_quantizers_keep_one_range_while_they_train(name, hw, tmp_path):
    """The quantizers of one unified-scale group (a Concat's inputs; on NPU, an Add's or a Mul's too) are one
    torch module, so that training cannot give the device different scales where it needs one."""
    from lowbit.frontends import graph_of

    factory, shape = REFERENCE_MODELS[name]
    x = torch.randn(16, *shape[1:], generator=torch.Generator().manual_seed(5))
    q = _quantize(factory(), x, target_device=hw)
    groups: dict[int, list] = {}
    for node in q.lowbit_graph:
        if node.op_type == "FakeQuantize" and "unified" in node.meta:
            groups.setdefault(node.meta["unified"], []).append(node.name)
    shared = [members for members in groups.values() if len(members) > 1]
    assert shared  # the model has unified groups of two or more quantizers on this device
    paths = [{q.lowbit_names[n] for n in members} for members in shared]
    assert all(len(p) == 1 for p in paths)  # one module per group
    fq_nodes = sum(node.op_type == "FakeQuantize" for node in q.lowbit_graph)
    modules = sum(isinstance(m, FakeQuantize) for m in q.modules())
    assert modules == fq_nodes - sum(len(m) - 1 for m in shared)
    before = {p: float(q.get_submodule(p).high.detach().max()) for (p,) in paths}

    trained = _train(q, x, steps=10, lr=1e-2)
    assert any(float(trained.get_submodule(p).high.detach().max()) != v for p, v in before.items())  # they learned
    graph = graph_of(trained)
    for members in shared:
        nodes = [graph.find_node(n) for n in members]
        for port in (1, 2):
            first = nodes[0].input(port).const
            assert all(np.array_equal(first, n.input(port).const) for n in nodes[1:]), members
    with torch.no_grad():
        simulated = trained(x).numpy()
    import onnx

    proto = onnx.load(str(lowbit.export(trained, tmp_path / "t.onnx")))
    assert sqnr(simulated, run_onnx(proto, {proto.graph.input[0].name: x.numpy()})[0]) > 35
    lowbit.save(trained, tmp_path / "t.state")  # the groups are in the state file: training resumes with them
    back = lowbit.load(factory(), tmp_path / "t.state", example_inputs=(x[:2],))
    assert sum(isinstance(m, FakeQuantize) for m in back.modules()) == modules
    with torch.no_grad():
        np.testing.assert_allclose(back(x).numpy(), simulated, atol=1e-5)


def _weight_ranges(q) -> dict[str, np.ndarray]:
    return {n.name: n.input(2).const for n in q.lowbit_graph
            if n.op_type == "FakeQuantize" and n.input(0).const is not None}


def test_auto_clips_per_tensor_weights_below_8_bits_and_keeps_the_others_on_their_ends(se):
    """"auto" is "mse" for a 4-bit per-tensor grid, "min_max" per channel and at 8 bits (bit-equal ranges)."""
    from lowbit.hw_configs import narrowed

    model, x = se
    devices = {"per channel": "ANY", "per tensor": narrowed("ANY", weights={"per_channel": False})}
    ranges = {(bits, grid, e): _weight_ranges(_quantize(model, x, bits={"weights": bits}, target_device=hw,
                                                        weight_range_estimator=e))
              for bits in (8, 4) for grid, hw in devices.items() for e in ("auto", "min_max", "mse")
              if bits == 4 or e != "mse"}

    def same(a, b):
        return a.keys() == b.keys() and len(a) == 9 and all(np.array_equal(a[k], b[k]) for k in a)

    for grid in devices:
        assert same(ranges[8, grid, "auto"], ranges[8, grid, "min_max"])
    assert same(ranges[4, "per channel", "auto"], ranges[4, "per channel", "min_max"])
    assert same(ranges[4, "per tensor", "auto"], ranges[4, "per tensor", "mse"])
    for grid in devices:
        mse, ends = ranges[4, grid, "mse"], ranges[4, grid, "min_max"]
        assert all(np.all(mse[k] <= ends[k] + 1e-7) for k in mse)  # clipped, never widened
        assert sum(float(np.mean(mse[k] / ends[k])) for k in mse) / len(mse) < 0.99  # (uniform weights: ~0.95)


def test_clipped_4_bit_weights_deploy_on_their_grid(se, tmp_path):
    """Weights past a clipped range take the grid's end, in the QDQ file's integers as in the simulation:
    before, the writer saturated them at int8's ends only, so that a clipped 4-bit weight kept values such as
    9 on its [-7, 7] grid."""
    model, x = se
    q = _quantize(model, x, bits={"weights": 4}, weight_range_estimator="mse")
    with torch.no_grad():
        simulated = q(x).numpy()
    proto = onnx.load(str(lowbit.export(q, tmp_path / "q.onnx")))
    weights = [numpy_helper.to_array(i) for i in proto.graph.initializer if i.name.endswith("_quantized")]
    assert len(weights) == 9 and all(w.min() >= -7 and w.max() <= 7 for w in weights)
    assert sum(int(np.sum(np.abs(w) == 7)) for w in weights) > 9  # some were past the ends
    ort_out = run_onnx(proto, {proto.graph.input[0].name: x.numpy()})[0]
    ov_out = run_openvino(str(lowbit.export(q, tmp_path / "q.xml")), [x.numpy()])[0]
    assert sqnr(simulated, ort_out) > 35 and sqnr(simulated, ov_out) > 35


def test_an_unknown_weight_range_estimator_is_named(se):
    model, x = se
    with pytest.raises(lowbit.OptionError, match="unknown weight_range_estimator 'max': use one of auto, min_max, "
                                                  "mse"):
        _quantize(model, x, weight_range_estimator="max")
