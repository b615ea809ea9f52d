"""The `lowbit` command: compile a model, show its text form, or tabulate a dump.

    lowbit compile IN.onnx -o OUT.onnx|OUT.xml [--passes a,b] [--hw CPU] [--dump-dir DIR]
    lowbit show MODEL.onnx
    lowbit diff DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import LowbitError


def _compile(args) -> int:
    from .api import codegen, lower
    from .compiler import run_pipeline
    from .ir.openvino import save_openvino
    from .passes import PassContext

    out = Path(args.output)
    if out.suffix.lower() not in (".onnx", ".xml"):
        raise LowbitError(f"cannot write {out.name!r}: the output must end in .onnx (ONNX) or .xml (OpenVINO IR)")
    passes = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes else None
    graph, pm = run_pipeline(lower(args.model), passes, PassContext(hw=args.hw), args.dump_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit", description="lowbit model-compression compiler")
    sub = parser.add_subparsers(dest="command", required=True)
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
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
