"""The `lowbit` command line: quantize and compile (to .onnx and .xml), show, diff, passes, --version, exit codes.

Most runs call `lowbit.cli.main([...])` in-process; one goes through
`python -m lowbit.cli` in a subprocess, as a user's shell would.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import run_onnx, run_openvino
from deploy_checks import HOST_OVERFLOW_FIX
from models import REFERENCE_MODELS

import lowbit
from lowbit.cli import main

REPO = Path(__file__).resolve().parent.parent
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    """The ConcatNet reference model as an .onnx file (13 Conv+BN+Relu), with an input batch and its outputs."""
    factory, shape = REFERENCE_MODELS["concat"]
    torch.manual_seed(1)
    model, x = factory(), torch.randn(*shape)
    proto = lowbit.codegen(lowbit.lower(model, (x,)), "onnx")
    path = tmp_path_factory.mktemp("cli") / "concat.onnx"
    onnx.save(proto, path)
    feeds = {"x": x.numpy()}
    return path, feeds, run_onnx(proto, feeds)


def _ops(model):
    return [n.op_type for n in model.graph.node]


def test_compile_to_onnx(onnx_file, tmp_path, capsys):
    src, feeds, want = onnx_file
    out = tmp_path / "sub" / "out.onnx"
    assert main(["compile", str(src), "-o", str(out)]) == 0
    assert out.exists()
    compiled = onnx.load(out)
    assert "BatchNormalization" not in _ops(compiled)
    assert _ops(compiled).count("Conv") == 13
    got = run_onnx(compiled, feeds)
    assert len(got) == len(want) == 1
    np.testing.assert_allclose(got[0], want[0], **TOL)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[:3]] == ["cleanup", "fold_bn", "fuse"]
    assert "fold_bn_conv x13" in lines[1]
    assert lines[-1] == f"wrote {out}"


def test_compile_to_openvino_xml(onnx_file, tmp_path):
    import openvino as ov

    src, feeds, want = onnx_file
    out = tmp_path / "model.xml"
    assert main(["compile", str(src), "-o", str(out)]) == 0
    assert out.exists() and out.with_suffix(".bin").exists()
    got = run_openvino(ov.Core().read_model(out), [feeds["x"]])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)


def test_compile_with_named_passes(onnx_file, tmp_path, capsys):
    src, feeds, want = onnx_file
    out = tmp_path / "out.onnx"
    assert main(["compile", str(src), "-o", str(out), "--passes", "cleanup, fold_bn"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == ["cleanup", "fold_bn"]
    compiled = onnx.load(out)
    assert "BatchNormalization" not in _ops(compiled)
    np.testing.assert_allclose(run_onnx(compiled, feeds)[0], want[0], **TOL)


def test_compile_with_only_fuse_keeps_batch_norm(onnx_file, tmp_path):
    src, feeds, want = onnx_file
    out = tmp_path / "out.onnx"
    assert main(["compile", str(src), "-o", str(out), "--passes", "fuse"]) == 0
    compiled = onnx.load(out)
    assert _ops(compiled).count("BatchNormalization") == 13
    np.testing.assert_array_equal(run_onnx(compiled, feeds)[0], want[0])


def test_compile_with_dump_dir_then_diff(onnx_file, tmp_path, capsys):
    src, _, _ = onnx_file
    dump = tmp_path / "dumps"
    assert main(["compile", str(src), "-o", str(tmp_path / "o.onnx"), "--dump-dir", str(dump)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'o.onnx'}; dumps in {dump}/index.html"
    assert (dump / "index.html").exists()
    assert [e["name"] for e in json.loads((dump / "passes.json").read_text())] == ["input", "cleanup", "fold_bn",
                                                                                   "fuse"]
    assert main(["diff", str(dump)]) == 0
    table = capsys.readouterr().out
    for name in ("input", "cleanup", "fold_bn", "fuse"):
        assert name in table
    row = next(line for line in table.splitlines() if " fold_bn " in line)
    assert "47 -> 34" in row and "-13" in row and "fold_bn_conv x13" in row


def test_show_prints_the_text_form(onnx_file, capsys):
    src, _, _ = onnx_file
    assert main(["show", str(src)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("graph ")
    assert out == str(lowbit.lower(src))
    assert out.count("= BatchNormalization(") == 13


def test_an_unknown_pass_exits_2_with_a_message(onnx_file, tmp_path, capsys):
    src, _, _ = onnx_file
    out = tmp_path / "out.onnx"
    assert main(["compile", str(src), "-o", str(out), "--passes", "cleanup,fold_bm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: unknown pass 'fold_bm'. Did you mean 'fold_bn'?")
    assert not out.exists()


def test_a_bad_output_suffix_exits_2(onnx_file, tmp_path, capsys):
    src, _, _ = onnx_file
    out = tmp_path / "out.txt"
    assert main(["compile", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot write 'out.txt'" in err and ".onnx" in err and ".xml" in err
    assert not out.exists()


def test_a_missing_model_and_a_missing_dump_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.onnx"
    assert main(["show", str(missing)]) == 2
    assert "nope.onnx" in capsys.readouterr().err
    assert main(["diff", str(tmp_path)]) == 2
    assert "passes.json" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile", "model.onnx"])                 # no -o
    assert e.value.code == 2
    assert "--output" in capsys.readouterr().err


def test_python_dash_m_lowbit_cli(onnx_file, tmp_path):
    src, feeds, want = onnx_file
    out = tmp_path / "sub.onnx"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-m", "lowbit.cli", "compile", str(src), "-o", str(out),
                          "--passes", "cleanup,fold_bn,fuse"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == f"wrote {out}"
    np.testing.assert_allclose(run_onnx(onnx.load(out), feeds)[0], want[0], **TOL)


# --------------------------------------------------------------------------- lowbit quantize


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """12 float32 samples for the ConcatNet input x[batch,1,8,8]: calib.npz, npy/ (one (1,8,8) file per sample)
    and npy_batched/ (one (1,1,8,8) file per sample)."""
    folder = tmp_path_factory.mktemp("calib")
    samples = np.random.default_rng(0).random((12, 1, 8, 8), dtype=np.float32)
    np.savez(folder / "calib.npz", x=samples)
    for name, add_batch_dim in (("npy", False), ("npy_batched", True)):
        (folder / name).mkdir()
        for i, s in enumerate(samples):
            np.save(folder / name / f"{i:03d}.npy", s[None] if add_batch_dim else s)
    return folder


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = torch.nn.Linear(8, 32), torch.nn.Linear(4, 32), torch.nn.Linear(32, 4)

    def forward(self, a, b):
        return self.head(torch.relu(self.a(a) + self.b(b)))


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    """A two-input model a[batch,8], b[batch,4] as .onnx, 10 samples as two.npz and as two/a/*.npy, two/b/*.npy."""
    folder = tmp_path_factory.mktemp("two")
    torch.manual_seed(0)
    path = folder / "two.onnx"
    onnx.save(lowbit.codegen(lowbit.lower(TwoInputs().eval(), (torch.randn(2, 8), torch.randn(2, 4))), "onnx"), path)
    rng = np.random.default_rng(2)
    data = {"a": 4 * rng.random((10, 8), dtype=np.float32), "b": rng.random((10, 4), dtype=np.float32)}
    np.savez(folder / "two.npz", **data)
    for name, samples in data.items():
        (folder / "two" / name).mkdir(parents=True)
        for i, s in enumerate(samples):
            np.save(folder / "two" / name / f"{i:02d}.npy", s)
    return path, folder, data


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if any pass runs: what is checked must be checked before any work."""
    import lowbit.compiler

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline ran before the error was found")

    monkeypatch.setattr(lowbit.compiler, "run_pipeline", refuse)


def _summary(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()][-2:]


@pytest.mark.parametrize("data,suffix", [("calib.npz", ".onnx"), ("npy", ".xml")])
def test_quantize_writes_an_int8_model(onnx_file, calibration, data, suffix, tmp_path, capsys):
    from deploy_checks import int8_count, openvino_layer_precisions, sqnr

    src = onnx_file[0]
    feeds = {"x": np.random.default_rng(1).random((16, 1, 8, 8), dtype=np.float32)}  # as the calibration data
    want = run_onnx(onnx.load(src), feeds)
    out = tmp_path / "new" / f"q{suffix}"
    assert main(["quantize", str(src), "-o", str(out), "--data", str(calibration / data),
                 "--subset-size", "8", "--target-device", "CPU"]) == 0
    summary, wrote = _summary(capsys)
    assert re.fullmatch(r"quantized concat\.onnx on 8 samples in \d+\.\d\d s: 14 weight and 15 activation "
                        r"quantizers", summary)
    assert wrote == f"wrote {out}"
    if suffix == ".onnx":
        q = onnx.load(out)
        assert _ops(q).count("QuantizeLinear") >= 15 and _ops(q).count("DequantizeLinear") >= 14 + 15
        got = run_onnx(q, feeds)
        assert sqnr(want[0], got[0]) >= 20
        # what the command writes is what lowbit.quantize returns for the same data and options
        from lowbit.quant.arrays import load_calibration_arrays

        items = load_calibration_arrays(calibration / data, lowbit.lower(src))
        api = lowbit.quantize(str(src), lowbit.Dataset(items), target_device="CPU", subset_size=8)
        assert _ops(api) == _ops(q)
        np.testing.assert_array_equal(run_onnx(api, feeds)[0], got[0])
    else:
        import openvino as ov

        assert out.with_suffix(".bin").exists()
        model = ov.Core().read_model(out)
        # written from the quantized graph, not from its QDQ form: one FakeQuantize per activation quantizer
        assert [op.get_type_name() for op in model.get_ordered_ops()].count("FakeQuantize") == 15
        assert int8_count(openvino_layer_precisions(out)) == 14
        assert sqnr(want[0], run_openvino(model, [feeds["x"]])[0]) >= 20


@pytest.mark.parametrize("data", ["two.npz", "two"])
def test_quantize_a_two_input_model(two_inputs, data, tmp_path, capsys):
    src, folder, samples = two_inputs
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(src), "-o", str(out), "--data", str(folder / data), "--subset-size", "8",
                 "--no-fast-bias-correction", "--preset", "mixed"]) == 0
    assert _summary(capsys)[0].startswith("quantized two.onnx on 8 samples in ")
    q = onnx.load(out)
    assert _ops(q).count("QuantizeLinear") >= 2
    scale = {i.name: float(onnx.numpy_helper.to_array(i)) for i in q.graph.initializer if i.name.endswith("_fq_scale")
             and not i.dims}
    assert 3 < scale["a_fq_scale"] / scale["b_fq_scale"] < 5  # each input calibrated on its own data (a = 4 b)
    # sample i of a is paired with sample i of b: the same as lowbit.quantize on items built by hand
    items = [{"a": samples["a"][i:i + 1], "b": samples["b"][i:i + 1]} for i in range(10)]
    api = lowbit.quantize(str(src), lowbit.Dataset(items), subset_size=8, fast_bias_correction=False, preset="mixed")
    np.testing.assert_array_equal(run_onnx(api, samples)[0], run_onnx(q, samples)[0])


def test_calibration_items_are_batch_1_views_in_the_saved_dtype(onnx_file, calibration):
    from lowbit.quant.arrays import load_calibration_arrays

    graph = lowbit.lower(onnx_file[0])
    saved = np.load(calibration / "calib.npz")["x"]
    for data in ("calib.npz", "npy", "npy_batched"):
        items = load_calibration_arrays(calibration / data, graph)
        assert len(items) == 12
        assert all(list(item) == ["x"] and item["x"].shape == (1, 1, 8, 8) and item["x"].dtype == np.float32
                   for item in items)
        np.testing.assert_array_equal(np.concatenate([item["x"] for item in items]), saved)
        assert all(item["x"].base is not None and item["x"].base is items[0]["x"].base for item in items)  # views
    assert len(load_calibration_arrays(calibration / "npy", graph, limit=5)) == 5


def _quantize_error(capsys, *args) -> str:
    assert main(["quantize", *map(str, args)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err.strip()


def test_quantize_names_data_that_does_not_fit(onnx_file, two_inputs, tmp_path, capsys, no_work):
    src = onnx_file[0]
    out = tmp_path / "q.onnx"
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 3, 32, 32)))
    assert _quantize_error(capsys, src, "-o", out, "--data", tmp_path / "wrong.npz") == (
        f"lowbit: error: --data '{tmp_path / 'wrong.npz'}': input 'x' expects float32[batch,1,8,8], got "
        "float64[4,3,32,32] (axis 0 counts the samples); save the data in the model's dtype and shape")
    np.savez(tmp_path / "half.npz", x=np.zeros((4, 1, 8, 8), np.float16))
    assert "input 'x' expects float32[batch,1,8,8], got float16[4,1,8,8]" in \
        _quantize_error(capsys, src, "-o", out, "--data", tmp_path / "half.npz")
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 1, 8, 8), np.float32))
    assert _quantize_error(capsys, src, "-o", out, "--data", tmp_path / "empty.npz").endswith(
        "empty.npz' holds no samples (axis 0 is empty)")
    np.savez(tmp_path / "two.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros(4, np.float32))
    assert _quantize_error(capsys, src, "-o", out, "--data", tmp_path / "two.npz") == (
        f"lowbit: error: --data '{tmp_path / 'two.npz'}': the model's inputs are ['x']; array(s) ['y'] match no "
        "input. Name one array after each input")
    assert _quantize_error(capsys, src, "-o", out, "--data", tmp_path / "missing.npz") == (
        f"lowbit: error: --data '{tmp_path / 'missing.npz'}' does not exist: give an .npz file or a folder of .npy "
        "files")
    (tmp_path / "calib.csv").write_text("1,2\n")
    assert _quantize_error(capsys, src, "-o", out, "--data", tmp_path / "calib.csv").endswith(
        "calib.csv' is neither an .npz file nor a folder of .npy files")
    (tmp_path / "mixed").mkdir()
    np.save(tmp_path / "mixed" / "0.npy", np.zeros((1, 8, 8), np.float32))
    np.save(tmp_path / "mixed" / "1.npy", np.zeros((1, 4, 4), np.float32))
    assert "0.npy holds float32[1,8,8], 1.npy float32[1,4,4]" in \
        _quantize_error(capsys, src, "-o", out, "--data", tmp_path / "mixed")
    (tmp_path / "none").mkdir()
    assert "holds no .npy files for input 'x'" in _quantize_error(capsys, src, "-o", out, "--data", tmp_path / "none")

    two, folder, samples = two_inputs
    np.savez(tmp_path / "only_a.npz", a=samples["a"], c=samples["b"])
    assert _quantize_error(capsys, two, "-o", out, "--data", tmp_path / "only_a.npz") == (
        f"lowbit: error: --data '{tmp_path / 'only_a.npz'}': the model's inputs are ['a', 'b']; no array for "
        "input(s) ['b']; array(s) ['c'] match no input. Name one array after each input")
    np.savez(tmp_path / "short.npz", a=samples["a"], b=samples["b"][:7])
    assert "the inputs have different numbers of samples {'a': 10, 'b': 7}" in \
        _quantize_error(capsys, two, "-o", out, "--data", tmp_path / "short.npz")
    (tmp_path / "ab" / "a").mkdir(parents=True)
    np.save(tmp_path / "ab" / "a" / "0.npy", samples["a"][0])
    assert _quantize_error(capsys, two, "-o", out, "--data", tmp_path / "ab") == (
        f"lowbit: error: --data '{tmp_path / 'ab'}': the model's inputs are ['a', 'b']; no subfolder of .npy files "
        "for input(s) ['b']. Name one subfolder of .npy files after each input")
    assert not out.exists()


def test_quantize_checks_device_and_output_before_any_work(onnx_file, calibration, tmp_path, capsys, no_work):
    src, data = onnx_file[0], calibration / "calib.npz"
    assert _quantize_error(capsys, src, "-o", tmp_path / "q.onnx", "--data", data, "--target-device", "TPU") == (
        "lowbit: error: unknown device 'TPU': use one of CPU, GPU, NPU, ANY, CPU_ORT or the path of a hardware "
        "config .json file")
    assert _quantize_error(capsys, src, "-o", tmp_path / "q.onnx", "--data", data, "--hw", "gpu.json") == (
        "lowbit: error: hardware config file 'gpu.json' does not exist")
    (tmp_path / "file").write_text("")
    err = _quantize_error(capsys, src, "-o", tmp_path / "file" / "q.onnx", "--data", data)
    assert err.startswith(f"lowbit: error: cannot write '{tmp_path / 'file' / 'q.onnx'}': its folder cannot be "
                          "created (")
    (tmp_path / "d.xml").mkdir()
    assert _quantize_error(capsys, src, "-o", tmp_path / "d.xml", "--data", data) == (
        f"lowbit: error: cannot write '{tmp_path / 'd.xml'}': it is a folder; give a file path")
    assert _quantize_error(capsys, src, "-o", tmp_path / "q.pt", "--data", data) == (
        "lowbit: error: cannot write 'q.pt': the path must end in .onnx (ONNX, QDQ) or .xml "
        "(OpenVINO IR, FakeQuantize)")
    # bad data is found before the output folder is created
    _quantize_error(capsys, src, "-o", tmp_path / "made" / "q.onnx", "--data", tmp_path / "missing.npz")
    assert not (tmp_path / "made").exists()


class DenseStep(torch.nn.Module):
    """DenseNet's pattern: a ReLU output and a signed conv output joined by a Concat, then BN-ReLU-conv."""

    def __init__(self):
        super().__init__()
        self.stem, self.grow = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)
        self.norm, self.head = torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        stem = torch.relu(self.stem(x))
        return self.head(torch.relu(self.norm(torch.cat([stem, self.grow(stem)], 1))))


def test_quantize_writes_the_onnx_form_a_runtime_asks_for(calibration, tmp_path, capsys):
    """--runtime openvino: the same grids, signed ones as int8 with zero point 0 (ONNX Runtime's form stores
    those a Concat joins to unsigned ones as uint8 with zero point 128); both run the same values."""
    torch.manual_seed(0)
    src, data = tmp_path / "dense.onnx", calibration / "calib.npz"
    onnx.save(lowbit.codegen(lowbit.lower(DenseStep().eval(), (torch.randn(2, 1, 8, 8),)), "onnx"), src)
    outputs = {}
    for runtime in ("onnxruntime", "openvino"):
        out = tmp_path / f"{runtime}.onnx"
        assert main(["quantize", str(src), "-o", str(out), "--data", str(data), "--subset-size", "8",
                     "--runtime", runtime, "--overflow-fix", HOST_OVERFLOW_FIX]) == 0  # this host's int8 kernels
        outputs[runtime] = onnx.load(out)
    capsys.readouterr()
    shifted = {rt: [t.name for t in m.graph.initializer if t.data_type == onnx.TensorProto.UINT8
                    and t.name.endswith("zero_point") and (onnx.numpy_helper.to_array(t) == 128).all()]
               for rt, m in outputs.items()}
    assert shifted["onnxruntime"] and not shifted["openvino"]
    feeds = {"x": np.random.default_rng(1).random((16, 1, 8, 8), dtype=np.float32)}
    np.testing.assert_array_equal(run_onnx(outputs["openvino"], feeds)[0], run_onnx(outputs["onnxruntime"], feeds)[0])


def test_quantize_refuses_a_runtime_for_an_xml_before_any_work(onnx_file, calibration, tmp_path, capsys, no_work):
    err = _quantize_error(capsys, onnx_file[0], "-o", tmp_path / "q.xml", "--data", calibration / "calib.npz",
                          "--runtime", "onnxruntime")
    assert err == ("lowbit: error: runtime='onnxruntime' is an option of onnx, not of openvino (.xml files): write "
                   "q.onnx for it, or leave it out")


def test_quantize_refuses_a_read_only_output_folder(onnx_file, calibration, tmp_path, capsys, no_work, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: answer as the kernel does for any other user
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: not (Path(p) == locked and mode & os.W_OK)
                            and access(p, mode, *a, **k))
    try:
        err = _quantize_error(capsys, onnx_file[0], "-o", locked / "q.onnx", "--data", calibration / "calib.npz")
    finally:
        locked.chmod(0o755)
    assert err == f"lowbit: error: cannot write '{locked / 'q.onnx'}': its folder '{locked}' is not writable"


def test_quantize_names_an_unknown_ignored_node_before_any_work(onnx_file, calibration, tmp_path, capsys, no_work):
    err = _quantize_error(capsys, onnx_file[0], "-o", tmp_path / "q.onnx", "--data", calibration / "calib.npz",
                          "--ignored-scope", "no_such_node")
    assert err.startswith("lowbit: error: ignored scope name 'no_such_node' matches no node of the model")


def test_quantize_refuses_a_quantized_model(onnx_file, calibration, tmp_path, capsys):
    src, data = onnx_file[0], calibration / "calib.npz"
    assert main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--data", str(data), "--subset-size", "4"]) == 0
    capsys.readouterr()
    err = _quantize_error(capsys, tmp_path / "q.onnx", "-o", tmp_path / "qq.onnx", "--data", data)
    assert "is already quantized" in err
    assert not (tmp_path / "qq.onnx").exists()


def test_quantize_puts_per_tensor_weights_where_asked(onnx_file, calibration, tmp_path, capsys):
    """With a device whose weights are per tensor, --per-tensor-weights unfolded gives each Conv (followed by a
    BatchNormalization in this file) one int8 scale per filter, the stored weight's grid scaled by its BN; the
    default gives one scale over the folded weight."""
    from lowbit.hw_configs import narrowed

    hw = tmp_path / "per_tensor.json"
    hw.write_text(json.dumps(narrowed("CPU", weights={"per_channel": False}).to_dict()))
    scales = {}
    for grid in ("folded", "unfolded"):
        out = tmp_path / f"{grid}.onnx"
        assert main(["quantize", str(onnx_file[0]), "-o", str(out), "--data", str(calibration / "calib.npz"),
                     "--subset-size", "8", "--target-device", str(hw), "--per-tensor-weights", grid]) == 0
        q = onnx.load(out)
        consts = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
        producers = {o: n for n in q.graph.node for o in n.output}
        scales[grid] = [consts[producers[n.input[1]].input[1]].shape for n in q.graph.node if n.op_type == "Conv"]
    assert len(scales["folded"]) == 13 and set(scales["folded"]) == {()}
    assert all(len(shape) == 1 and shape[0] > 1 for shape in scales["unfolded"])


def test_quantize_clips_weight_ranges_where_asked(onnx_file, calibration, tmp_path):
    """--weight-range-estimator mse narrows 8-bit weight scales (the default, auto, keeps min/max at 8 bits)."""
    scales = {}
    for estimator in ("auto", "mse"):
        out = tmp_path / f"{estimator}.onnx"
        assert main(["quantize", str(onnx_file[0]), "-o", str(out), "--data", str(calibration / "calib.npz"),
                     "--subset-size", "8", "--weight-range-estimator", estimator]) == 0
        q = onnx.load(out)
        consts = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
        producers = {o: n for n in q.graph.node for o in n.output}
        scales[estimator] = [consts[producers[n.input[1]].input[1]] for n in q.graph.node if n.op_type == "Conv"]
    assert len(scales["mse"]) == len(scales["auto"]) == 13
    assert all(np.all(m <= a * (1 + 1e-6)) for m, a in zip(scales["mse"], scales["auto"]))
    assert sum(int(np.sum(m < 0.99 * a)) for m, a in zip(scales["mse"], scales["auto"])) > 0


@pytest.mark.parametrize("option,value,message", [
    ("--overflow-fix", "auto", r"argument --overflow-fix: invalid choice: 'auto' \(choose from '?enable'?, "
                               r"'?first_layer'?, '?disable'?\)"),
    ("--subset-size", "0", r"argument --subset-size: '0' is not a positive integer"),
    ("--preset", "fast", r"argument --preset: invalid choice: 'fast'"),
    ("--per-tensor-weights", "stored", r"argument --per-tensor-weights: invalid choice: 'stored'"),
    ("--weight-range-estimator", "max", r"argument --weight-range-estimator: invalid choice: 'max'"),
])
def test_bad_option_values_are_refused_by_the_parser(option, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "m.onnx", "-o", "q.onnx", "--data", "calib.npz", option, value])
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_quantize_help_gives_the_data_convention(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for part in ("calib.npz", "calib/<input name>/*.npy", "batch dim of 1", "--overflow-fix", "--target-device"):
        assert part in text


def test_version_and_passes(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"lowbit {version('lowbit')}\n"
    assert main(["passes"]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert set(rows) == set(lowbit.passes.PASSES) >= {"cleanup", "fold_bn", "fuse", "quantize",
                                                      "fast_bias_correction", "smooth_quant", "snap_bias"}
    assert rows["quantize"] == lowbit.passes.PASSES["quantize"].description
    assert all(rows.values())


def test_prune_writes_a_smaller_onnx_and_xml_and_reports_every_group(onnx_file, tmp_path, capsys):
    src, feeds, want = onnx_file
    out = tmp_path / "pruned.onnx"
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.5", "--round-to", "2"]) == 0
    pruned = onnx.load(out)
    before = {i.name: tuple(i.dims) for i in onnx.load(src).graph.initializer}
    after = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    convs = [n for n in before if len(before[n]) == 4]
    assert convs and all(after[n][0] < before[n][0] and after[n][0] % 2 == 0 for n in convs)
    assert run_onnx(pruned, feeds)[0].shape == want[0].shape
    lines = capsys.readouterr().out.splitlines()
    assert sum("left alone: they reach the graph output" in line for line in lines) == 1  # the classifier
    assert re.match(r"parameters [\d,]+ -> [\d,]+, MACs per sample [\d,]+ -> [\d,]+", lines[-2])
    assert lines[-1] == f"wrote {out}"
    xml = tmp_path / "pruned.xml"
    assert main(["prune", str(src), "-o", str(xml), "--ratio", "0.5", "--round-to", "2"]) == 0
    import openvino as ov

    got = run_openvino(ov.Core().read_model(str(xml)), [feeds["x"]])[0]
    np.testing.assert_allclose(got, run_onnx(pruned, feeds)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--ratio", "1.5"], r"ratio=1.5 is not in \[0, 1\)"),
    (["--criterion", "taylor"], "criterion 'taylor' needs data"),
    (["--criterion", "l7"], "unknown criterion 'l7'"),
])
def test_prune_errors_are_named(onnx_file, tmp_path, capsys, args, message):
    src, _, _ = onnx_file
    assert main(["prune", str(src), "-o", str(tmp_path / "p.onnx"), *args]) == 2
    assert re.search(message, capsys.readouterr().err)
