"""The `lowbit` command: quantize, prune or compile a model, show its text form, tabulate a dump, list the passes.

    lowbit quantize IN.onnx -o OUT.onnx|OUT.xml --data calib.npz|DIR [--subset-size N]
                    [--preset performance|mixed] [--target-device CPU|GPU|NPU|ANY|hw.json]
                    [--model-type transformer] [--ignored-scope NAME[,NAME...]]
                    [--overflow-fix enable|first_layer|disable] [--per-tensor-weights folded|unfolded]
                    [--weight-range-estimator auto|min_max|mse]
                    [--no-fast-bias-correction] [--dump-dir DIR] [--runtime onnxruntime|openvino]
    lowbit compile IN.onnx -o OUT.onnx|OUT.xml [--passes a,b] [--hw CPU] [--dump-dir DIR] [--runtime ...]
    lowbit prune IN.onnx -o OUT.onnx|OUT.xml [--ratio 0.5] [--criterion l2] [--round-to N]
                 [--ignored-scope NAME[,NAME...]] [--data calib.npz|DIR (for --criterion taylor)]
    lowbit show MODEL.onnx
    lowbit diff DIR
    lowbit passes
    lowbit --version

`quantize` is `lowbit.quantize` (NNCF's options and defaults) on calibration
data read by `lowbit.quant.arrays` (an .npz keyed by input name, or a folder
of .npy files, one per sample, `DIR/<input name>/*.npy`). `quantize` and
`compile` run their pipeline over the graph and write it the same way:
`.onnx` as ONNX (QDQ where quantized), `.xml` as OpenVINO IR (FakeQuantize).

Every check comes before any work: the output suffix, the device, the data
(against the model's inputs: names, dtypes, shapes), the ignored scope, then
the output folder (created if needed). A user's mistake prints
`lowbit: error: ...` and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from .errors import LowbitError


QUANTIZE_HELP = """\
Quantize IN.onnx (FP32) on calibration data, as nncf.quantize does, and write
ONNX QDQ (-o x.onnx) or OpenVINO IR with FakeQuantize (-o x.xml and x.bin).

--data is one of:
  calib.npz   one array per model input, keyed by the input's name (any one
              key for a one-input model); axis 0 counts the samples:
              np.savez("calib.npz", x=samples)
  calib/      one .npy file per sample in a subfolder per input,
              calib/<input name>/*.npy, paired across inputs by file-name
              order; a one-input model may keep its files in calib/ itself
Each sample is one calibration item with a batch dim of 1; arrays must have
the dtype and shape the model's inputs take. The device, the data and -o are
checked before any work; a mistake prints `lowbit: error: ...`, exit code 2.
"""


def _output(path: str, runtime: str | None = None, *, create: bool = True) -> Path:
    """The -o path, checked: a .onnx or .xml file whose folder can be created and written (with `create`), and
    that `--runtime` can run."""
    from . import backends
    from .compiler import writable_parent

    out = Path(path)
    backends.check_options(backends.backend_for_path(out), out, {"runtime": runtime})
    if create:
        writable_parent(out)
    return out


def _run_and_write(graph, passes, ctx, dump_dir, out: Path, runtime: str | None):
    """Run the pipeline over `graph` and write the result to `out`: ONNX (QDQ where quantized, in the form
    `runtime` runs) for .onnx, OpenVINO IR (FakeQuantize) for .xml. `compile` and `quantize` share it; the
    PassManager's records come back."""
    from . import backends
    from .compiler import run_pipeline

    graph, pm = run_pipeline(graph, passes, ctx, dump_dir)
    backends.save(graph, out, runtime=runtime)
    return pm.records


def _wrote(out: Path, dump_dir) -> str:
    return f"wrote {out}" + (f"; dumps in {dump_dir}/index.html" if dump_dir else "")


def _ignored_scope(names: str | None, graph):
    """--ignored-scope NAME[,NAME...] as an IgnoredScope, resolved now: a name that matches no node fails before
    any pass runs."""
    from .quant import IgnoredScope

    if not names:
        return None
    scope = IgnoredScope(names=[n.strip() for n in names.split(",") if n.strip()])
    scope.resolve(graph)
    return scope


def _quantize(args) -> int:
    """`lowbit.quantize` for an .onnx file, with its checks done first and its graph written as .onnx or .xml.

    The passes and context are those of compiler.quantize (`ptq_passes`, `pass_context`); the pipeline runs here
    so that an .xml is written from the quantized graph itself (as `compile -o x.xml` does) and the summary
    comes from the pass records.
    """
    import time

    from .api import lower
    from .compiler import pass_context, ptq_passes
    from .hw_configs import load_hw_config
    from .quant import Dataset
    from .quant.arrays import check_data_path, load_calibration_arrays

    # every check before any work: the cheap ones first, the output folder (which it creates) last
    out = _output(args.output, args.runtime, create=False)
    load_hw_config(args.target_device)
    check_data_path(args.data)
    graph = lower(args.model)
    items = load_calibration_arrays(args.data, graph, limit=args.subset_size)
    scope = _ignored_scope(args.ignored_scope, graph)
    _output(args.output)

    dataset = Dataset(items)
    passes = ptq_passes(dataset, args.model_type, args.fast_bias_correction)
    ctx = pass_context(hw=args.target_device, dataset=dataset, subset_size=args.subset_size, ignored_scope=scope,
                       preset=args.preset, model_type=args.model_type, overflow_fix=args.overflow_fix,
                       per_tensor_weights=args.per_tensor_weights,
                       weight_range_estimator=args.weight_range_estimator)
    start = time.perf_counter()
    records = _run_and_write(graph, passes, ctx, args.dump_dir, out, args.runtime)
    seconds = time.perf_counter() - start
    fired = sum((r.fired for r in records if r.name == "quantize"), Counter())
    print(f"quantized {Path(args.model).name} on {len(items)} samples in {seconds:.2f} s: "
          f"{fired['weight_quantizers']} weight and {fired['activation_quantizers']} activation quantizers")
    print(_wrote(out, args.dump_dir))
    return 0


def _passes(args) -> int:
    from .passes import PASSES

    for name in sorted(PASSES):
        print(f"{name:<24} {PASSES[name].description}")
    return 0


def _compile(args) -> int:
    from .api import lower
    from .hw_configs import load_hw_config
    from .passes import PassContext, resolve

    out = _output(args.output, args.runtime, create=False)
    load_hw_config(args.hw)
    passes = [resolve(p.strip()) for p in args.passes.split(",") if p.strip()] if args.passes else None
    _output(args.output)
    records = _run_and_write(lower(args.model), passes, PassContext(hw=args.hw), args.dump_dir, out, args.runtime)
    for r in records:
        fired = ", ".join(f"{k} x{v}" for k, v in sorted(r.fired.items())) or "-"
        print(f"{r.index:02d} {r.name:<24} {1000 * r.seconds:8.1f} ms  "
              f"{r.nodes_before:>6} -> {r.nodes_after:<6} {fired}")
    print(_wrote(out, args.dump_dir))
    return 0


def _prune(args) -> int:
    """`lowbit.prune` for an .onnx file (the prune_filters pass after cleanup), written as .onnx or .xml, with a
    line per channel group: pruned (before -> after) or left alone, and why."""
    from . import backends
    from .api import lower
    from .compiler import pass_context, run_pipeline
    from .pruning import PruneSpec, cost
    from .quant import Dataset
    from .quant.arrays import check_data_path, load_calibration_arrays

    out = _output(args.output, create=False)
    spec = PruneSpec(ratio=args.ratio, criterion=args.criterion, round_to=args.round_to)
    graph = lower(args.model)
    dataset = None
    if args.data:
        check_data_path(args.data)
        dataset = Dataset(load_calibration_arrays(args.data, graph, limit=args.subset_size))
    scope = _ignored_scope(args.ignored_scope, graph)
    _output(args.output)
    before = cost(graph)
    ctx = pass_context(dataset=dataset, subset_size=args.subset_size, ignored_scope=scope, pruning=spec)
    graph, _ = run_pipeline(graph, ["cleanup", "prune_filters"], ctx)
    backends.save(graph, out)
    after = cost(graph)
    for row in graph.meta["pruning"]:
        layers = ", ".join(row["layers"][:3]) + (" ..." if len(row["layers"]) > 3 else "")
        state = f"{row['channels']} -> {row['kept']}" if not row["blocked"] else f"left alone: {row['blocked']}"
        print(f"{layers:<48} {state}")
    print(f"parameters {before.params:,} -> {after.params:,}, MACs per sample {before.macs:,} -> {after.macs:,}")
    print(_wrote(out, None))
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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def main(argv=None) -> int:
    from .hw_configs import DEVICES
    from .backends.qdq import RUNTIMES
    from .pruning import CRITERIA
    from .passes.options import DEFAULT_OVERFLOW_FIX, MODEL_TYPES, OVERFLOW_FIX, PER_TENSOR_WEIGHTS, PRESETS
    from .quant.weight_mse import WEIGHT_RANGE_ESTIMATORS

    parser = argparse.ArgumentParser(prog="lowbit", description="lowbit model-compression compiler")
    parser.add_argument("--version", action="version", version=f"lowbit {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="post-training INT8 quantization of an ONNX model (as nncf.quantize)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=QUANTIZE_HELP)
    q.add_argument("model", metavar="IN.onnx", help="input .onnx file (FP32)")
    q.add_argument("-o", "--output", required=True, metavar="OUT.onnx|OUT.xml",
                   help="output .onnx (QDQ) or .xml (OpenVINO IR)")
    q.add_argument("--data", required=True, metavar="NPZ|DIR",
                   help="calibration data: an .npz file or a folder of .npy files")
    q.add_argument("--subset-size", type=_positive, default=300, metavar="N",
                   help="calibration samples to use (default 300)")
    q.add_argument("--preset", choices=PRESETS, help="performance (symmetric activations) or mixed")
    q.add_argument("--target-device", "--hw", default="ANY", metavar="DEVICE",
                   help=f"one of {', '.join(DEVICES)} or a hardware config .json (default ANY, as NNCF)")
    q.add_argument("--model-type", choices=MODEL_TYPES, help="transformer: SmoothQuant and the mixed preset")
    q.add_argument("--ignored-scope", metavar="NAME[,NAME...]",
                   help="node names to keep in FP32 (as `lowbit show` prints them)")
    q.add_argument("--overflow-fix", choices=OVERFLOW_FIX, default=DEFAULT_OVERFLOW_FIX,
                   help="weights on a 7-bit grid: enable (for AVX2-only CPUs), first_layer (default), disable")
    q.add_argument("--per-tensor-weights", choices=PER_TENSOR_WEIGHTS, default="folded",
                   help="where a device's weights are per tensor and a BatchNormalization folds into the layer: one "
                        "grid over the folded weight (folded, default) or over the stored one (unfolded, as NNCF)")
    q.add_argument("--weight-range-estimator", choices=WEIGHT_RANGE_ESTIMATORS, default="auto",
                   help="weight ranges: min_max (their ends), mse (clipped for the least rounding error), auto "
                        "(default: mse for per-tensor grids below 8 bits, else min_max)")
    q.add_argument("--no-fast-bias-correction", dest="fast_bias_correction", action="store_false",
                   help="skip fast bias correction")
    q.add_argument("--dump-dir", metavar="DIR",
                   help="write the graph after every pass, with diffs and index.html, here")
    q.set_defaults(run=_quantize)
    c = sub.add_parser("compile", help="run passes over an ONNX model and write ONNX or OpenVINO IR")
    c.add_argument("model", help="input .onnx file")
    c.add_argument("-o", "--output", required=True, help="output .onnx or .xml")
    c.add_argument("--passes", help="comma-separated pass names (default: the device's pipeline)")
    c.add_argument("--hw", default="CPU", help="target device or hardware config JSON (default CPU)")
    c.add_argument("--dump-dir", help="write the graph after every pass, with diffs and index.html, here")
    c.set_defaults(run=_compile)
    r = sub.add_parser("prune", help="filter pruning of an ONNX model: a physically smaller .onnx or .xml")
    r.add_argument("model", metavar="IN.onnx", help="input .onnx file (FP32)")
    r.add_argument("-o", "--output", required=True, metavar="OUT.onnx|OUT.xml", help="output .onnx or .xml")
    r.add_argument("--ratio", type=float, default=0.5, help="fraction of each group's channels to remove (0.5)")
    r.add_argument("--criterion", default="l2", help=f"one of {', '.join(CRITERIA)} (default l2)")
    r.add_argument("--round-to", type=_positive, default=1, metavar="N", help="keep channel counts multiples of N")
    r.add_argument("--ignored-scope", metavar="NAME[,NAME...]", help="layers (node names) whose filters stay")
    r.add_argument("--data", metavar="NPZ|DIR", help="inputs for --criterion taylor (as `quantize --data`)")
    r.add_argument("--subset-size", type=_positive, default=300, metavar="N", help="samples of --data to use")
    r.set_defaults(run=_prune)
    for command in (q, c):
        command.add_argument("--runtime", choices=RUNTIMES,
                             help="the runtime an .onnx output is for (default onnxruntime): each runs another "
                                  "QDQ form as INT8 (see lowbit/backends/qdq.py)")
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
