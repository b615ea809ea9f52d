"""Post-training quantization end to end, on real data: the digits CNN (examples/digits.py) keeps its accuracy
in INT8, stays trainable, and agrees with its ONNX Runtime and OpenVINO exports."""

import copy
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import run_onnx, run_openvino
from deploy_checks import HOST_OVERFLOW_FIX, activation_quantizers, repeated_quantizers

import lowbit
from lowbit.backends.torch_fq import FakeQuantize

sys.path.insert(0, str(Path(__file__).parent.parent))
from examples.digits import accuracy, load_digits_split, trained  # noqa: E402

FUSE = ["cleanup", "fold_bn", "fuse"]
PTQ_NO_FBC = [*FUSE, "quantize"]
PTQ = [*PTQ_NO_FBC, "fast_bias_correction"]
CALIBRATION = 300


def sqnr(reference, x) -> float:
    reference, x = np.asarray(reference, np.float64), np.asarray(x, np.float64)
    return float(10 * np.log10((reference ** 2).sum() / max(((reference - x) ** 2).sum(), 1e-30)))


def top1(logits) -> np.ndarray:
    return np.asarray(logits).argmax(1)


def _fq_modules(module):
    return {name: m for name, m in module.named_modules() if isinstance(m, FakeQuantize)}


def _run(module, x):
    with torch.no_grad():
        return module(x).numpy()


@pytest.fixture(scope="module")
def data():
    return load_digits_split()


@pytest.fixture(scope="module")
def model():
    return trained("digits_cnn")


@pytest.fixture(scope="module")
def calibration(data):
    x_train = data[0]
    return lowbit.Dataset([x_train[i:i + 1] for i in range(CALIBRATION)])


@pytest.fixture(scope="module")
def quantized(model, calibration):
    return lowbit.quantize(model, calibration)


@pytest.fixture(scope="module")
def onnx_model(model, data):
    return lowbit.codegen(lowbit.lower(model, (data[0][:1],)), "onnx")


# --------------------------------------------------------------------------- torch in, torch out


def test_quantize_returns_torch_module_with_fake_quantize(quantized):
    assert isinstance(quantized, torch.nn.Module)
    fqs = _fq_modules(quantized)
    # 4 weights (3 convs + fc) and 6 activations (input, stem, residual branch, block output, conv2, pool)
    assert len(fqs) == 10
    assert sum(m.low.dim() > 0 for m in fqs.values()) == 4


def test_int8_accuracy_within_half_a_point_of_fp32(model, quantized, data):
    _, _, x_test, y_test = data
    fp32 = accuracy(model, x_test, y_test)
    int8 = accuracy(quantized, x_test, y_test)
    assert fp32 > 0.95  # the model really learned the task
    assert int8 >= fp32 - 0.005, (fp32, int8)


def test_quantized_module_takes_any_batch(quantized, data):
    x = data[2]
    full = _run(quantized, x[:7])
    for b in (1, 3):
        np.testing.assert_allclose(_run(quantized, x[:b]), full[:b], rtol=1e-5, atol=1e-5)


def test_gradients_reach_weights_and_ranges(quantized, data):
    q = copy.deepcopy(quantized).train()
    x_train, y_train = data[0], data[1]
    q.zero_grad()
    F.cross_entropy(q(x_train[:128]), y_train[:128]).backward()
    params = dict(q.named_parameters())
    conv_weights = [n for n, p in params.items() if n.endswith("weight") and p.dim() == 4]
    assert len(conv_weights) == 3
    for name in conv_weights:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    fqs = _fq_modules(q)
    high_grads = [float(m.high.grad.abs().sum()) for m in fqs.values() if m.high.grad is not None]
    assert len(high_grads) == len(fqs) and all(g > 0 for g in high_grads)  # every range is learnable
    # the performance preset's grids are symmetric: the low end follows the high end (zero stays a level), so
    # it gets no gradient of its own; an asymmetric grid learns both ends
    assert {m.grid for m in fqs.values()} == {"symmetric"}
    assert all(m.low.grad is None for m in fqs.values())


def test_one_fine_tuning_step(quantized, data):
    q = copy.deepcopy(quantized).train()
    x_train, y_train = data[0], data[1]
    opt = torch.optim.SGD(q.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in q.named_parameters()}
    loss0 = F.cross_entropy(q(x_train[:256]), y_train[:256])
    loss0.backward()
    opt.step()
    changed = [n for n, p in q.named_parameters() if not torch.equal(p, before[n])]
    assert any("weight_fq" in n for n in changed) and any(n.endswith("conv1.weight") for n in changed)
    with torch.no_grad():
        loss1 = F.cross_entropy(q(x_train[:256]), y_train[:256])
    assert torch.isfinite(loss1)
    assert loss1.item() < loss0.item() + 0.05
    # the original quantized module is untouched by fine-tuning a copy
    assert all(torch.equal(p, dict(quantized.named_parameters())[n]) for n, p in before.items())


# --------------------------------------------------------------------------- ONNX in, ONNX out


def _onnx_dataset(data, kind):
    x_train = data[0].numpy()
    items = [x_train[i:i + 1] for i in range(CALIBRATION)]
    if kind == "dicts":
        items = [{"x": a} for a in items]
    return lowbit.Dataset(items)


@pytest.fixture(scope="module")
def onnx_quantized(onnx_model, data):
    return lowbit.quantize(onnx_model, _onnx_dataset(data, "arrays"))


def test_onnx_model_comes_back_as_qdq_model_proto(onnx_quantized):
    assert isinstance(onnx_quantized, onnx.ModelProto)
    onnx.checker.check_model(onnx_quantized)
    ops = [n.op_type for n in onnx_quantized.graph.node]
    assert activation_quantizers(onnx_quantized) == 6 and len(repeated_quantizers(onnx_quantized)) == 1  # Flatten
    assert ops.count("QuantizeLinear") == 7 and ops.count("DequantizeLinear") == 4 + 7


@pytest.mark.parametrize("kind", ["arrays", "dicts"])
def test_onnx_int8_accuracy(onnx_model, data, kind, onnx_quantized):
    _, _, x_test, y_test = data
    q = onnx_quantized if kind == "arrays" else lowbit.quantize(onnx_model, _onnx_dataset(data, kind))
    fp32 = run_onnx(onnx_model, {"x": x_test.numpy()})[0]
    int8 = run_onnx(q, {"x": x_test.numpy()})[0]
    acc_fp32 = float((top1(fp32) == y_test.numpy()).mean())
    acc_int8 = float((top1(int8) == y_test.numpy()).mean())
    assert acc_fp32 > 0.95
    assert acc_int8 >= acc_fp32 - 0.005, (acc_fp32, acc_int8)


def test_onnx_and_torch_paths_agree(onnx_quantized, quantized, data):
    x_test = data[2]
    ort = run_onnx(onnx_quantized, {"x": x_test.numpy()})[0]
    torch_out = _run(quantized, x_test)
    assert (top1(ort) == top1(torch_out)).mean() >= 0.99
    assert sqnr(torch_out, ort) >= 30


# --------------------------------------------------------------------------- export and agreement


@pytest.fixture(scope="module")
def exported(quantized, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return lowbit.export(quantized, root / "digits.onnx"), lowbit.export(quantized, root / "digits.xml")


def test_exported_onnx_agrees_with_torch(quantized, exported, data):
    x_test = data[2]
    model = onnx.load(str(exported[0]))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    ort = run_onnx(model, {"x": x_test.numpy()})[0]
    want = _run(quantized, x_test)
    assert (top1(ort) == top1(want)).mean() >= 0.995
    assert sqnr(want, ort) >= 35


def test_exported_openvino_agrees_with_torch(quantized, exported, data):
    import openvino as ov

    xml = exported[1]
    assert xml.with_suffix(".bin").exists()
    ov_model = ov.Core().read_model(str(xml))
    types = [op.get_type_name() for op in ov_model.get_ordered_ops()]
    # activations are FakeQuantize ops; weights are stored as 8-bit constants that OpenVINO decompresses
    assert types.count("FakeQuantize") == 6
    int_weights = [op for op in ov_model.get_ordered_ops() if op.get_type_name() == "Constant"
                   and op.get_element_type().get_type_name() in ("i8", "u8") and len(op.get_shape()) >= 2]
    assert len(int_weights) == 4
    x_test = data[2]
    got = run_openvino(ov_model, [x_test.numpy()])[0]
    want = _run(quantized, x_test)
    assert (top1(got) == top1(want)).mean() >= 0.995
    assert sqnr(want, got) >= 35


def _fresh(model, data):
    """A quantized module of one's own to modify (small calibration set: fast)."""
    return lowbit.quantize(model, lowbit.Dataset([data[0][i:i + 16] for i in range(0, 64, 16)]))


def test_export_after_fine_tuning_reflects_new_parameters(model, data, tmp_path):
    x_test = data[2][:64]
    q = _fresh(model, data)
    before = run_onnx(onnx.load(str(lowbit.export(q, tmp_path / "before.onnx"))), {"x": x_test.numpy()})[0]
    shift = torch.arange(10, dtype=torch.float32)
    with torch.no_grad():
        q.get_parameter("fc.bias").add_(shift)
        q.get_parameter("conv2.weight").mul_(0.8)
        fq = _fq_modules(q)
        act = next(m for m in fq.values() if m.low.dim() == 0 and m.low.item() < 0)  # the signed residual branch
        act.high.mul_(0.5)
        act.low.mul_(0.5)
    after = run_onnx(onnx.load(str(lowbit.export(q, tmp_path / "after.onnx"))), {"x": x_test.numpy()})[0]
    want = _run(q, x_test)
    assert not np.allclose(after, before, atol=1e-2)
    assert sqnr(want, after) >= 35
    assert (top1(after) == top1(want)).mean() >= 0.98
    xml = lowbit.export(q, tmp_path / "after.xml")
    import openvino as ov

    got = run_openvino(ov.Core().read_model(str(xml)), [x_test.numpy()])[0]
    assert sqnr(want, got) >= 35


def test_export_after_a_training_step_matches_module(model, data, tmp_path):
    q = _fresh(model, data).train()
    x_train, y_train, x_test, _ = data
    opt = torch.optim.SGD(q.parameters(), lr=5e-2)
    F.cross_entropy(q(x_train[:256]), y_train[:256]).backward()
    opt.step()
    q.eval()
    got = run_onnx(onnx.load(str(lowbit.export(q, tmp_path / "tuned.onnx"))), {"x": x_test.numpy()})[0]
    want = _run(q, x_test)
    assert sqnr(want, got) >= 35
    assert (top1(got) == top1(want)).mean() >= 0.995


def test_deep_copy_of_quantized_module_still_exports(quantized, data, tmp_path):
    """Users deep-copy models all the time (EMA, checkpoints, per-experiment copies); the copy must export."""
    q = copy.deepcopy(quantized)
    with torch.no_grad():
        q.get_parameter("fc.bias").add_(1.0)
    got = run_onnx(onnx.load(str(lowbit.export(q, tmp_path / "copy.onnx"))), {"x": data[2].numpy()})[0]
    want = _run(q, data[2])
    assert sqnr(want, got) >= 35


# --------------------------------------------------------------------------- fast bias correction


@pytest.fixture(scope="module")
def fbc_pair(model, calibration):
    with_fbc = lowbit.compile(model, PTQ, hw="CPU", dataset=calibration, progress=False)
    without = lowbit.compile(model, PTQ_NO_FBC, hw="CPU", dataset=calibration, progress=False)
    return with_fbc, without


def test_fast_bias_correction_changes_biases_only(fbc_pair):
    with_fbc, without = fbc_pair
    a, b = with_fbc.state_dict(), without.state_dict()
    assert a.keys() == b.keys()
    biases = [k for k in a if k.endswith("bias") and "_fq" not in k]
    assert len(biases) == 4
    changed = [k for k in biases if not torch.equal(a[k], b[k])]
    assert len(changed) >= 3, changed  # every quantized layer with a bias gets a correction
    for k in a:
        if k not in biases:
            assert torch.equal(a[k], b[k]), k  # weights and ranges are the same
    for k in changed:
        assert float((a[k] - b[k]).abs().max()) < 0.5 * float(b[k].abs().max()) + 0.1  # a correction, not a reset


def test_fast_bias_correction_does_not_hurt(model, fbc_pair, data):
    with_fbc, without = fbc_pair
    x_test = data[2]
    fp32 = _run(model, x_test)
    assert sqnr(fp32, _run(with_fbc, x_test)) >= sqnr(fp32, _run(without, x_test)) - 0.5


def _onnx_biases(model):
    """Conv/Gemm biases by layer; a quantized Gemm head is written as Gemm -> Add(bias), named as the Gemm was."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    biases = {n.name: inits[n.input[2]] for n in model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2}
    biases.update({n.name: inits[n.input[1]] for n in model.graph.node if n.op_type == "Add" and n.input[1] in inits
                   and n.input[0] in producers and producers[n.input[0]].op_type == "Gemm"})
    return biases


def test_fast_bias_correction_runs_on_onnx(onnx_model, data, onnx_quantized):
    without = lowbit.quantize(onnx_model, _onnx_dataset(data, "arrays"), fast_bias_correction=False)
    a, b = _onnx_biases(onnx_quantized), _onnx_biases(without)
    assert a.keys() == b.keys() and len(a) == 4
    assert sum(not np.array_equal(a[k], b[k]) for k in a) >= 3
    x_test = data[2].numpy()
    fp32 = run_onnx(onnx_model, {"x": x_test})[0]
    assert sqnr(fp32, run_onnx(onnx_quantized, {"x": x_test})[0]) >= \
        sqnr(fp32, run_onnx(without, {"x": x_test})[0]) - 0.5


# --------------------------------------------------------------------------- range estimators


@pytest.fixture(scope="module")
def by_estimator(model, data):
    ds = lowbit.Dataset([data[0][i:i + 16] for i in range(0, 128, 16)])
    return {e: _fq_modules(lowbit.compile(model, PTQ_NO_FBC, dataset=ds, range_estimator=e, progress=False))
            for e in ("min_max", "mean_min_max", "percentile")}


def _activation_bounds(fqs):
    return {n: (abs(m.low.item()), m.high.item()) for n, m in fqs.items() if m.low.dim() == 0}


def test_min_max_ranges_contain_mean_min_max_ranges(by_estimator):
    wide, mean = _activation_bounds(by_estimator["min_max"]), _activation_bounds(by_estimator["mean_min_max"])
    assert wide.keys() == mean.keys() and len(wide) == 6
    for name in wide:
        assert wide[name][0] >= mean[name][0] - 1e-6, name
        assert wide[name][1] >= mean[name][1] - 1e-6, name
    assert any(wide[n][1] > mean[n][1] * 1.01 for n in wide)  # they do differ somewhere


def test_percentile_ranges(by_estimator):
    pct, mean = _activation_bounds(by_estimator["percentile"]), _activation_bounds(by_estimator["mean_min_max"])
    assert pct.keys() == mean.keys()
    for name in pct:
        assert 0 < pct[name][1] <= mean[name][1] * (1 + 1e-5), name  # a sample's 99.99th percentile <= its max
    # weights do not depend on the estimator
    for name, m in by_estimator["percentile"].items():
        if m.low.dim() > 0:
            assert torch.equal(m.high, by_estimator["min_max"][name].high)


@pytest.mark.parametrize("option, value, known", [
    ("range_estimator", "max", "mean_min_max, min_max, percentile"),
    ("preset", "fast", "performance, mixed"),
    ("model_type", "llm", "transformer"),
    ("overflow_fix", "auto", "enable, first_layer, disable"),
])
def test_unknown_option_values_are_lowbit_errors_that_list_the_known_ones(model, calibration, option, value, known):
    with pytest.raises(lowbit.OptionError, match=f"unknown {option} '{value}': use one of {known}"):
        lowbit.compile(model, PTQ, dataset=calibration, **{option: value})


# --------------------------------------------------------------------------- the user's model is never mutated


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, [m.training for m in module.modules()]


def _same(module, snapshot):
    state, modes = snapshot
    now = module.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state) and \
        [m.training for m in module.modules()] == modes


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torch_model_is_not_mutated(model, data, mode):
    user = copy.deepcopy(model)
    user.train(mode == "train")
    snapshot = _snapshot(user)
    ds = lowbit.Dataset([data[0][i:i + 8] for i in range(0, 64, 8)])
    q = lowbit.quantize(user, ds)
    assert _same(user, snapshot)  # BatchNorm statistics included: calibration never ran the user's module in train
    assert _fq_modules(q)
    assert not _fq_modules(user)
    # quantizing the train-mode model gives the eval-mode (BN-folded) network, not one with batch statistics
    x_test, y_test = data[2], data[3]
    assert accuracy(q, x_test, y_test) >= accuracy(model, x_test, y_test) - 0.005


def test_onnx_model_is_not_mutated(onnx_model, data):
    before = onnx_model.SerializeToString()
    lowbit.quantize(onnx_model, _onnx_dataset(data, "arrays"))
    assert onnx_model.SerializeToString() == before


# --------------------------------------------------------------------------- compile() runs the PTQ pipeline


def test_compile_with_dataset_runs_the_ptq_pipeline(model, data, tmp_path):
    dump = tmp_path / "dump"
    ds = lowbit.Dataset([data[0][i:i + 8] for i in range(0, 64, 8)])
    q = lowbit.compile(model, dataset=ds, dump_dir=dump, progress=False)
    names = sorted(p.stem for p in dump.glob("*.txt"))
    assert [n for n in names if n[:2].isdigit() and n[:2] != "00"] == [
        "01-cleanup", "02-fold_bn", "03-fuse", "04-quantize", "05-fast_bias_correction", "06-snap_bias"]
    assert (dump / "index.html").exists()
    assert "FakeQuantize" in (dump / "04-quantize.txt").read_text()
    assert "FakeQuantize" not in (dump / "03-fuse.txt").read_text()
    assert len(_fq_modules(q)) == 10


def test_compile_without_dataset_does_not_quantize(model, data):
    out = lowbit.compile(model, example_inputs=(data[0][:2],))
    assert not _fq_modules(out)
    x = data[2][:16]
    np.testing.assert_allclose(_run(out, x), _run(model, x), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- linears on token sequences (MatMul)


class TokenMLP(torch.nn.Module):
    """Linears applied to [batch, tokens, features]: lowered as MatMul with a transposed weight, not Gemm."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.mix = torch.nn.Linear(32, 32)  # square: a layout mix-up would not even fail on shapes
        self.down = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.down(torch.relu(self.mix(torch.relu(self.up(x)))))


@pytest.fixture(scope="module")
def token_mlp():
    torch.manual_seed(0)
    user = TokenMLP().eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 5, 16, generator=g) for _ in range(4)]
    return user, lowbit.quantize(user, lowbit.Dataset(data), overflow_fix=HOST_OVERFLOW_FIX), \
        torch.randn(16, 5, 16, generator=g)


def test_quantized_token_linears_keep_parameter_layout(token_mlp):
    user, q, _ = token_mlp
    for name in ("up.weight", "mix.weight", "down.weight"):
        assert q.get_parameter(name).shape == user.get_parameter(name).shape, name


def test_quantized_token_linears_export_matches_module(token_mlp, tmp_path):
    user, q, x = token_mlp
    want = _run(q, x)
    assert sqnr(_run(user, x), want) >= 20  # the quantized module itself is fine
    got = run_onnx(onnx.load(str(lowbit.export(q, tmp_path / "mlp.onnx"))), {"x": x.numpy()})[0]
    assert sqnr(want, got) >= 35


def test_subset_size_limits_the_items_read(model, data):
    seen = []

    def transform(i):
        seen.append(i)
        return data[0][i:i + 1]

    lowbit.quantize(model, lowbit.Dataset(range(200), transform), subset_size=10, fast_bias_correction=False)
    assert max(seen) == 9 and len(seen) <= 11  # the first item may be read once more to capture the model
