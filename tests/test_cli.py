"""The `lowbit` command line: compile (to .onnx and .xml), show, diff, and its exit codes.

Most runs call `lowbit.cli.main([...])` in-process; one goes through
`python -m lowbit.cli` in a subprocess, as a user's shell would.
"""

import json
import os
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
