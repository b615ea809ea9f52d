"""The `lowbit` command line: compile (to .onnx and .xml), show, diff, and its exit codes.

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
def calibration(onnx_file, tmp_path_factory):
    """12 samples for the ConcatNet input x[?,1,8,8], as an .npz and as a folder of .npy files."""
    folder = tmp_path_factory.mktemp("calib")
    samples = np.random.default_rng(0).random((12, 1, 8, 8), dtype=np.float32)
    np.savez(folder / "calib.npz", x=samples)
    (folder / "npy").mkdir()
    for i, s in enumerate(samples):
        np.save(folder / "npy" / f"{i:03d}.npy", s)
    return folder


@pytest.mark.parametrize("data,suffix", [("calib.npz", ".onnx"), ("npy", ".xml")])
def test_quantize_writes_an_int8_model(onnx_file, calibration, data, suffix, tmp_path, capsys):
    from deploy_checks import int8_count, openvino_layer_precisions, sqnr

    src = onnx_file[0]
    feeds = {"x": np.random.default_rng(1).random((16, 1, 8, 8), dtype=np.float32)}  # as the calibration data
    want = run_onnx(onnx.load(src), feeds)
    out = tmp_path / f"q{suffix}"
    assert main(["quantize", str(src), "-o", str(out), "--data", str(calibration / data),
                 "--subset-size", "8", "--target-device", "CPU"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("quantized concat.onnx on 8 samples in ")
    assert lines[-2].endswith("14 weight and 15 activation quantizers")
    assert lines[-1] == f"wrote {out}"
    if suffix == ".onnx":
        q = onnx.load(out)
        assert _ops(q).count("DequantizeLinear") >= 14 + 15
        assert sqnr(want[0], run_onnx(q, feeds)[0]) >= 20
    else:
        assert int8_count(openvino_layer_precisions(out)) == 14
        import openvino as ov

        assert sqnr(want[0], run_openvino(ov.Core().read_model(out), [feeds["x"]])[0]) >= 20


def _quantize_error(capsys, *args) -> str:
    assert main(["quantize", *map(str, args)]) == 2
    return capsys.readouterr().err.strip()


def test_quantize_names_data_that_does_not_fit(onnx_file, tmp_path, capsys):
    src = onnx_file[0]
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 3, 32, 32)))
    err = _quantize_error(capsys, src, "-o", tmp_path / "q.onnx", "--data", tmp_path / "wrong.npz")
    assert err == (f"lowbit: error: --data '{tmp_path / 'wrong.npz'}': input 'x' expects float32[?,1,8,8], got "
                   "float64[4, 3, 32, 32] (axis 0 counts the samples); convert the data to what the model takes")
    np.savez(tmp_path / "two.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros(4, np.float32))
    err = _quantize_error(capsys, src, "-o", tmp_path / "q.onnx", "--data", tmp_path / "two.npz")
    assert "the model's inputs are ['x']; arrays ['y'] match no input" in err
    err = _quantize_error(capsys, src, "-o", tmp_path / "q.onnx", "--data", tmp_path / "missing.npz")
    assert err.endswith("missing.npz' does not exist: give an .npz file or a folder of .npy")
    assert not (tmp_path / "q.onnx").exists()


def test_quantize_checks_device_and_output_before_any_work(onnx_file, calibration, tmp_path, capsys):
    src, data = onnx_file[0], calibration / "calib.npz"
    err = _quantize_error(capsys, src, "-o", tmp_path / "q.onnx", "--data", data, "--target-device", "TPU")
    assert err.startswith("lowbit: error: unknown device 'TPU': use one of CPU, GPU, NPU, ANY")
    (tmp_path / "file").write_text("")
    err = _quantize_error(capsys, src, "-o", tmp_path / "file" / "q.onnx", "--data", data)
    assert "cannot write" in err and "its folder cannot be created" in err
    err = _quantize_error(capsys, src, "-o", tmp_path / "q.pt", "--data", data)
    assert err == "lowbit: error: cannot write 'q.pt': the output must end in .onnx (ONNX) or .xml (OpenVINO IR)"


def test_quantize_refuses_a_quantized_model(onnx_file, calibration, tmp_path, capsys):
    src, data = onnx_file[0], calibration / "calib.npz"
    assert main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--data", str(data), "--subset-size", "4"]) == 0
    err = _quantize_error(capsys, tmp_path / "q.onnx", "-o", tmp_path / "qq.onnx", "--data", data)
    assert "is already quantized" in err


def test_bad_option_values_are_refused_by_the_parser(onnx_file, calibration, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(onnx_file[0]), "-o", str(tmp_path / "q.onnx"), "--data", str(calibration),
              "--overflow-fix", "auto"])
    assert e.value.code == 2
    assert re.search(r"argument --overflow-fix: invalid choice: 'auto' \(choose from '?enable'?, '?first_layer'?, "
                     r"'?disable'?\)", capsys.readouterr().err)


def test_version_and_passes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lowbit {lowbit.__version__}"
    assert main(["passes"]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert set(rows) == set(lowbit.passes.PASSES) and "quantize" in rows
    assert rows["quantize"].startswith("place, calibrate and insert FakeQuantize")
