"""The `lowbit` command: quantize or compile a model, show its text form, tabulate a dump, list the passes.

    lowbit quantize IN.onnx -o OUT.onnx|OUT.xml --data calib.npz|DIR [--subset-size N] [--preset P]
                    [--target-device D] [--model-type transformer] [--ignored-scope a,b] [--overflow-fix F]
                    [--no-fast-bias-correction] [--dump-dir DIR]
    lowbit compile IN.onnx -o OUT.onnx|OUT.xml [--passes a,b] [--hw CPU] [--dump-dir DIR]
    lowbit show MODEL.onnx
    lowbit diff DIR
    lowbit passes
    lowbit --version

Every option is checked before any work; a user's mistake prints
`lowbit: error: ...` and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import LowbitError, OutputPathError


def _output(path: str) -> Path:
    """The -o path, checked: a .onnx or .xml file whose folder can be written."""
    from .compiler import writable_parent

    out = Path(path)
    if out.suffix.lower() not in (".onnx", ".xml"):
        raise OutputPathError(f"cannot write {out.name!r}: the output must end in .onnx (ONNX) or .xml "
                              "(OpenVINO IR)")
    writable_parent(out)
    return out


def _quantize(args) -> int:
    import time

    from .api import lower
    from .compiler import export, quantize
    from .hw_configs import load_hw_config
    from .quant import Dataset, IgnoredScope
    from .quant.arrays import load_calibration_arrays

    out = _output(args.output)
    load_hw_config(args.target_device)
    model = str(args.model)
    items = load_calibration_arrays(args.data, lower(model))
    scope = IgnoredScope(names=[n.strip() for n in args.ignored_scope.split(",") if n.strip()]) \
        if args.ignored_scope else None
    start = time.perf_counter()
    qdq = quantize(model, Dataset(items), preset=args.preset, target_device=args.target_device,
                   subset_size=args.subset_size, fast_bias_correction=args.fast_bias_correction,
                   model_type=args.model_type, ignored_scope=scope, dump_dir=args.dump_dir,
                   overflow_fix=args.overflow_fix)
    seconds = time.perf_counter() - start
    inits = {i.name for i in qdq.graph.initializer}
    dequantize = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear"]
    weights = sum(n.input[0] in inits for n in dequantize)
    activations = len({tuple(n.input[1:3]) for n in qdq.graph.node if n.op_type == "QuantizeLinear"})
    export(qdq, out)
    print(f"quantized {Path(model).name} on {min(len(items), args.subset_size)} samples in {seconds:.2f} s: "
          f"{weights} weight and {activations} activation quantizers")
    print(f"wrote {out}" + (f"; dumps in {args.dump_dir}/index.html" if args.dump_dir else ""))
    return 0


def _passes(args) -> int:
    from .passes import PASSES

    for name in sorted(PASSES):
        print(f"{name:<24} {PASSES[name].description}")
    return 0


def _compile(args) -> int:
    from .api import codegen, lower
    from .compiler import run_pipeline
    from .ir.openvino import save_openvino
    from .passes import PassContext

    out = _output(args.output)
    passes = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes else None
    graph, pm = run_pipeline(lower(args.model), passes, PassContext(hw=args.hw), args.dump_dir)
    if out.suffix.lower() == ".xml":
        save_openvino(graph, out)
    else:
        out.write_bytes(codegen(graph, "onnx").SerializeToString())
    for r in pm.records:
        fired = ", ".join(f"{k} x{v}" for k, v in sorted(r.fired.items())) or "-"
        print(f"{r.index:02d} {r.name:<24} {1000 * r.seconds:8.1f} ms  {r.nodes_before:>6} -> {r.nodes_after:<6} {fired}")
    print(f"wrote {out}" + (f"; dumps in {args.dump_dir}/index.html" if args.dump_dir else ""))
    return 0


def _show(args) -> int:
    from .api import lower

    sys.stdout.write(str(lower(args.model)))
    return 0


def _diff(args) -> int:
    from rich.console import Console
    from rich.table import Table

    index = Path(args.dump_dir) / "passes.json"
    if not index.exists():
        raise LowbitError(f"{str(index)!r} does not exist: pass the dump_dir of a compile run")
    table = Table(title=f"passes in {args.dump_dir}")
    for col in ("#", "pass", "ms", "nodes", "added", "removed", "changed", "rules fired"):
        table.add_column(col, justify="left" if col in ("pass", "rules fired") else "right")
    for e in json.loads(index.read_text()):
        added, removed, changed = e["counts"]
        fired = ", ".join(f"{k} x{v}" for k, v in sorted(e["fired"].items())) or "-"
        table.add_row(f"{e['index']:02d}", e["name"], f"{1000 * e['seconds']:.1f}", f"{e['before']} -> {e['after']}",
                      f"+{added}", f"-{removed}", f"~{changed}", fired)
    Console(width=160).print(table)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lowbit")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def main(argv=None) -> int:
    from .compiler import MODEL_TYPES, PRESETS
    from .hw_configs import DEVICES
    from .passes.quantize import DEFAULT_OVERFLOW_FIX, OVERFLOW_FIX

    parser = argparse.ArgumentParser(prog="lowbit", description="lowbit model-compression compiler")
    parser.add_argument("--version", action="version", version=f"lowbit {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="post-training INT8 quantization of an ONNX model (as nncf.quantize)",
                       description="Quantize IN.onnx on calibration data and write ONNX QDQ (.onnx) or OpenVINO "
                                   "IR (.xml). --data is an .npz with one array per model input (named as the "
                                   "input; any name for a one-input model), first axis = samples; or a folder of "
                                   ".npy files, one sample per file (for several inputs, one subfolder per "
                                   "input name).")
    q.add_argument("model", help="input .onnx file (FP32)")
    q.add_argument("-o", "--output", required=True, help="output .onnx (QDQ) or .xml (OpenVINO IR)")
    q.add_argument("--data", required=True, help="calibration data: an .npz file or a folder of .npy files")
    q.add_argument("--subset-size", type=int, default=300, help="calibration samples to use (default 300)")
    q.add_argument("--preset", choices=PRESETS, help="performance (symmetric activations) or mixed")
    q.add_argument("--target-device", "--hw", default="ANY",
                   help=f"one of {', '.join(DEVICES)} or a hardware config .json (default ANY, as NNCF)")
    q.add_argument("--model-type", choices=MODEL_TYPES, help="transformer: SmoothQuant and the mixed preset")
    q.add_argument("--ignored-scope", help="comma-separated node names to keep in FP32")
    q.add_argument("--overflow-fix", choices=OVERFLOW_FIX, default=DEFAULT_OVERFLOW_FIX,
                   help="weights on a 7-bit grid: enable (for AVX2-only CPUs), first_layer (default), disable")
    q.add_argument("--no-fast-bias-correction", dest="fast_bias_correction", action="store_false",
                   help="skip fast bias correction")
    q.add_argument("--dump-dir", help="write the graph after every pass, with diffs and index.html, here")
    q.set_defaults(run=_quantize)
    c = sub.add_parser("compile", help="run passes over an ONNX model and write ONNX or OpenVINO IR")
    c.add_argument("model", help="input .onnx file")
    c.add_argument("-o", "--output", required=True, help="output .onnx or .xml")
    c.add_argument("--passes", help="comma-separated pass names (default: the device's pipeline)")
    c.add_argument("--hw", default="CPU", help="target device or hardware config JSON (default CPU)")
    c.add_argument("--dump-dir", help="write the graph after every pass, with diffs and index.html, here")
    c.set_defaults(run=_compile)
    s = sub.add_parser("show", help="print the text form of a model's graph")
    s.add_argument("model", help=".onnx file")
    s.set_defaults(run=_show)
    d = sub.add_parser("diff", help="tabulate what each pass did in a dump directory")
    d.add_argument("dump_dir")
    d.set_defaults(run=_diff)
    p = sub.add_parser("passes", help="list the registered passes")
    p.set_defaults(run=_passes)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
