"""The backends behind one registry: what a graph is written as, in memory (`codegen(graph, name)`) and to a
file (`export`, the CLI's `-o`), chosen by name or by file suffix.

    register_backend(Backend("tflite", suffixes=(".tflite",), build=..., save=...))

Each built-in backend imports its framework only when it runs, so the registry costs nothing to import.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import OptionError, OutputPathError, UnknownTargetError


@dataclass(frozen=True)
class Backend:
    """One way to write a graph: `build(graph, **options)` gives the in-memory model, `save(graph, path,
    **options)` writes the file(s) for a path ending in one of `suffixes`. `options` names the keywords it
    takes (export and the CLI pass only those)."""

    name: str
    build: Callable[..., Any]
    suffixes: tuple[str, ...] = ()
    save: Callable[..., None] | None = None
    options: tuple[str, ...] = ()
    description: str = ""


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    for suffix in backend.suffixes:
        other = next((b.name for b in BACKENDS.values() if suffix in b.suffixes and b.name != backend.name), None)
        if other is not None:
            raise ValueError(f"suffix {suffix!r} is already written by backend {other!r}")
    BACKENDS[backend.name] = backend
    return backend


def backend(name: str) -> Backend:
    """The backend called `name` (a codegen target)."""
    if name not in BACKENDS:
        raise UnknownTargetError(f"unknown codegen target {name!r}: choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def suffixes() -> list[str]:
    return [s for b in BACKENDS.values() for s in b.suffixes]


def _described() -> str:
    return " or ".join(f"{s} ({b.description})" for b in BACKENDS.values() for s in b.suffixes)


def backend_for_path(path: str | os.PathLike) -> Backend:
    """The backend that writes files like `path`, or OutputPathError naming the suffixes there are."""
    suffix = Path(path).suffix.lower()
    found = next((b for b in BACKENDS.values() if suffix in b.suffixes), None)
    if found is None or found.save is None:
        raise OutputPathError(f"cannot write {Path(path).name!r}: the path must end in {_described()}")
    return found


def check_options(found: Backend, path: str | os.PathLike, options: dict[str, Any]) -> dict[str, Any]:
    """The options `found` takes, with None ones dropped; OptionError for one it does not take."""
    given = {k: v for k, v in options.items() if v is not None}
    for key, value in given.items():
        if key not in found.options:
            takers = [b for b in BACKENDS.values() if key in b.options and b.suffixes]
            hint = f": write {Path(path).stem}{takers[0].suffixes[0]} for it" if takers else ""
            raise OptionError(f"{key}={value!r} is an option of {', '.join(b.name for b in takers) or 'no backend'}, "
                              f"not of {found.name} ({Path(path).suffix} files){hint}, or leave it out")
    return given


def save(graph, path: str | os.PathLike, **options: Any) -> Path:
    """Write `graph` to `path` with the backend its suffix names."""
    found = backend_for_path(path)
    found.save(graph, Path(path), **check_options(found, path, options))
    return Path(path)


# -- the built-in backends ----------------------------------------------------------------------------------


def _torch(graph):
    """The fx.GraphModule, holding the graph it came from (`lowbit_graph`), so that export and graph_of read its
    current weights and ranges back (after training, too)."""
    from ..backends.torch_emit import keep_on_copy, to_torch

    module = to_torch(graph)
    module.lowbit_graph = graph.copy()
    keep_on_copy(module, "lowbit_graph")
    return module


def _onnx(graph, runtime: str = "onnxruntime"):
    from ..backends.onnx import to_onnx

    return to_onnx(graph, runtime=runtime)


def _save_onnx(graph, path: Path, runtime: str = "onnxruntime") -> None:
    import onnx

    onnx.save(_onnx(graph, runtime), str(path))


def _openvino(graph):
    from ..backends.openvino import to_openvino

    return to_openvino(graph)


def _save_openvino(graph, path: Path) -> None:
    from ..backends.openvino import save_openvino

    save_openvino(graph, path)


register_backend(Backend("torch", _torch, description="an fx.GraphModule; FakeQuantize as trainable modules"))
register_backend(Backend("onnx", _onnx, (".onnx",), _save_onnx, ("runtime",), description="ONNX, QDQ"))
register_backend(Backend("openvino", _openvino, (".xml",), _save_openvino,
                         description="OpenVINO IR, FakeQuantize"))
