"""Pass-by-pass dumps: the graph after every pass as text, diff and DOT (SVG where Graphviz is), and an index.

For pass N the dump directory gets `NN-name.txt`, `NN-name.diff`,
`NN-name.dot` (and `NN-name.svg` when `dot` is on PATH and the graph is not
huge); `00-input.*` is the graph the pipeline started from. `index.html`
lists every pass with its time, node counts, nodes added/removed/changed and
the rules that fired, and shows each diff.

Pass and rule names are the user's, so they are never trusted: a file name
keeps only `[A-Za-z0-9._-]` of the pass name (bounded, never `..`, unique in
the directory), and every string `index.html` shows is HTML-escaped.
"""

from __future__ import annotations

import difflib
import html
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import DumpError
from ..ir.graph import Graph
from ..ir.text import _const_body, _type, node_text, print_graph

SVG_NODE_LIMIT = 1500  # rendering larger graphs takes Graphviz minutes
NAME_LIMIT = 60  # characters of a pass name kept in its file names


@dataclass
class Snapshot:
    """The text of a graph, keyed by node name and constant name, to diff against a later one."""

    text: str
    nodes: dict[str, str]
    constants: dict[str, str]

    @classmethod
    def of(cls, graph: Graph) -> Snapshot:
        nodes = {n.name: node_text(n) for n in graph}
        constants = {v.name: f"{_type(v)} = {_const_body(v.const)}" for v in graph.constants.values()}
        return cls(print_graph(graph), nodes, constants)

    def diff(self, before: Snapshot) -> GraphDiff:
        return GraphDiff(before, self)


class GraphDiff:
    """Nodes and constants added, removed and changed between two snapshots (matched by name)."""

    def __init__(self, before: Snapshot, after: Snapshot):
        self.added = [after.nodes[k] for k in after.nodes if k not in before.nodes]
        self.removed = [before.nodes[k] for k in before.nodes if k not in after.nodes]
        self.changed = [(before.nodes[k], after.nodes[k]) for k in after.nodes
                        if k in before.nodes and before.nodes[k] != after.nodes[k]]
        self.const_added = [f"{k}: {after.constants[k]}" for k in after.constants if k not in before.constants]
        self.const_removed = [f"{k}: {before.constants[k]}" for k in before.constants if k not in after.constants]
        self.const_changed = [f"{k}: {before.constants[k]}  ->  {after.constants[k]}" for k in after.constants
                              if k in before.constants and before.constants[k] != after.constants[k]]
        self.unified = list(difflib.unified_diff(before.text.splitlines(), after.text.splitlines(),
                                                 "before", "after", lineterm="", n=1))

    def counts(self) -> tuple[int, int, int]:
        return len(self.added), len(self.removed), len(self.changed)

    def render(self) -> str:
        out = [f"# nodes: +{len(self.added)} added, -{len(self.removed)} removed, ~{len(self.changed)} changed; "
               f"constants: +{len(self.const_added)} -{len(self.const_removed)} ~{len(self.const_changed)}"]
        out += [f"+ {line}" for line in self.added]
        out += [f"- {line}" for line in self.removed]
        for old, new in self.changed:
            out += [f"~ {old}", f"  -> {new}"]
        out += [f"+ const {line}" for line in self.const_added]
        out += [f"- const {line}" for line in self.const_removed]
        out += [f"~ const {line}" for line in self.const_changed]
        if self.unified:
            out += ["", "# unified diff of the text form", *self.unified]
        return "\n".join(out) + "\n"


def to_dot(graph: Graph, highlight: set[str] = frozenset()) -> str:
    """A Graphviz DOT picture of the graph; nodes named in `highlight` are filled."""
    lines = [f"digraph {json.dumps(graph.name)} {{", "  rankdir=TB; node [shape=box, fontsize=10];"]
    ids: dict[int, str] = {}
    for i, v in enumerate(graph.inputs):
        ids[id(v)] = f"in{i}"
        lines.append(f"  in{i} [label={json.dumps(v.name + ' ' + _type(v))}, shape=ellipse];")
    for i, n in enumerate(graph):
        style = ", style=filled, fillcolor=\"#ffe9a8\"" if n.name in highlight else ""
        lines.append(f"  n{i} [label={json.dumps(n.qualified_op + chr(10) + n.name)}{style}];")
        for v in n.outputs:
            ids[id(v)] = f"n{i}"
        for v in n.inputs:
            if v is not None and id(v) in ids:
                lines.append(f"  {ids[id(v)]} -> n{i} [label={json.dumps(_type(v))}, fontsize=8];")
    for i, v in enumerate(graph.outputs):
        lines.append(f"  out{i} [label={json.dumps(v.name)}, shape=ellipse];")
        if id(v) in ids:
            lines.append(f"  {ids[id(v)]} -> out{i};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def safe_stem(index: int, name: str, taken: set[str]) -> str:
    """`NN-name` for a file name: only [A-Za-z0-9._-], no `..`, at most NAME_LIMIT name characters, not in `taken`."""
    part = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name))
    part = re.sub(r"\.{2,}", ".", part).strip("._-")[:NAME_LIMIT].strip("._-") or "pass"
    stem, i = f"{index:02d}-{part}", 1
    while stem.lower() in taken:  # case-insensitive file systems
        i += 1
        stem = f"{index:02d}-{part}-{i}"
    taken.add(stem.lower())
    return stem


def _attr(text: str) -> str:
    """`text` escaped for an HTML attribute value (quotes included)."""
    return html.escape(str(text), quote=True)


class DumpWriter:
    """Writes the files of one pipeline's dump into `directory` (raises DumpError if it cannot)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".lowbit-write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise DumpError(f"cannot write the dump directory {str(self.dir)!r}: {e.strerror or e}. "
                            "Pass a dump_dir you can write to") from None
        self.dot = shutil.which("dot")
        self.entries: list[dict] = []
        self.stems: set[str] = {"index", "passes"}

    def _write(self, stem: str, graph: Graph, text: str, diff: str, highlight: set[str]) -> dict:
        dot = to_dot(graph, highlight)
        try:
            for ext, content in (("txt", text), ("diff", diff), ("dot", dot)):
                (self.dir / f"{stem}.{ext}").write_text(content)
        except OSError as e:
            raise DumpError(f"cannot write {stem}.{ext} in the dump directory {str(self.dir)!r}: "
                            f"{e.strerror or e}. Pass a dump_dir you can write to") from None
        svg = None
        if self.dot and len(graph) <= SVG_NODE_LIMIT:
            try:
                subprocess.run([self.dot, "-Tsvg", "-o", str(self.dir / f"{stem}.svg")], input=dot.encode(),
                               check=True, capture_output=True, timeout=120)
                svg = f"{stem}.svg"
            except (subprocess.SubprocessError, OSError):
                svg = None
        return {"stem": stem, "diff": diff, "svg": svg}

    def start(self, graph: Graph, snapshot: Snapshot) -> None:
        stem = safe_stem(0, "input", self.stems)
        entry = self._write(stem, graph, snapshot.text, "# the graph the pipeline starts from\n", set())
        entry.update(index=0, name="input", seconds=0.0, before=len(graph), after=len(graph), counts=(0, 0, 0),
                     fired={})
        self.entries.append(entry)

    def step(self, record, graph: Graph, snapshot: Snapshot, diff: GraphDiff) -> None:
        highlight = {line.split(" ", 2)[1] for line in diff.added} | {new.split(" ", 2)[1] for _, new in diff.changed}
        stem = safe_stem(record.index, record.name, self.stems)
        entry = self._write(stem, graph, snapshot.text, diff.render(), highlight)
        entry.update(index=record.index, name=str(record.name), seconds=record.seconds, before=record.nodes_before,
                     after=record.nodes_after, counts=diff.counts(), fired=dict(record.fired))
        self.entries.append(entry)

    def finish(self, records) -> None:
        try:
            (self.dir / "index.html").write_text(render_index(self.entries))
            (self.dir / "passes.json").write_text(json.dumps(
                [{k: e[k] for k in ("index", "name", "seconds", "before", "after", "counts", "fired")}
                 for e in self.entries], indent=1))
        except OSError as e:
            raise DumpError(f"cannot write index.html or passes.json in the dump directory {str(self.dir)!r}: "
                            f"{e.strerror or e}. Pass a dump_dir you can write to") from None


def render_index(entries: list[dict]) -> str:
    """The index page; every name, stem, rule and diff in it is escaped (attributes with their quotes)."""
    rows, sections = [], []
    for e in entries:
        added, removed, changed = e["counts"]
        stem, name = _attr(e["stem"]), html.escape(str(e["name"]))
        fired = ", ".join(f"{html.escape(str(rule))} &times;{html.escape(str(count))}"
                          for rule, count in sorted(e["fired"].items(), key=lambda item: str(item[0])))
        rows.append(f"<tr><td>{e['index']:02d}</td><td><a href='#{stem}'>{name}</a></td>"
                    f"<td>{1000 * e['seconds']:.1f}</td><td>{e['before']}</td><td>{e['after']}</td>"
                    f"<td>+{added}</td><td>-{removed}</td><td>~{changed}</td><td>{fired or '&ndash;'}</td></tr>")
        links = " &middot; ".join(f"<a href='{stem}.{ext}'>{ext}</a>" for ext in ("txt", "diff", "dot"))
        picture = f"<p><a href='{_attr(e['svg'])}'>graph (svg)</a></p>" if e["svg"] else ""
        sections.append(f"<h2 id='{stem}'>{e['index']:02d} {name}</h2><p>{links}</p>"
                        f"{picture}<details{' open' if e['index'] else ''}><summary>diff</summary>"
                        f"<pre>{html.escape(e['diff'])}</pre></details>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>lowbit passes</title><style>"
            "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right} td:nth-child(2),td:last-child{text-align:left}"
            "pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:12px}</style></head><body>"
            "<h1>lowbit: what each pass did</h1><table><tr><th>#</th><th>pass</th><th>ms</th><th>nodes before</th>"
            "<th>nodes after</th><th>added</th><th>removed</th><th>changed</th><th>rules fired</th></tr>"
            + "".join(rows) + "</table>" + "".join(sections) + "</body></html>\n")
