"""The compression-state file: what lowbit did to a model, saved as JSON + .npz, rebuilt on the original model
without calibration.

    lowbit.save(q, "resnet.state")              # resnet.state.json + resnet.state.npz
    q2 = lowbit.load(resnet, "resnet.state")    # the same outputs, bit for bit; no data needed

The JSON holds the format and its version, the lowbit version, the origin (torch or onnx), the passes that ran
and the device and options they ran with, the device's whole hardware config (`hw_config`, in the JSON form
lowbit/hw_configs reads), a fingerprint of the source model (its inputs, and its weights' names, dtypes and
shapes), the compressed graph in lowbit's text form (every quantizer's place, levels and node attributes
included) and, per constant, the facts the torch writer names parameters by; for a module pruned with masks,
its masks and the schedule's position (`load` gives the controller back, so fine-tuning resumes). The .npz holds
every constant of the compressed graph (weights after folding and bias correction, quantizer ranges as they are,
after training too), keyed by index.

`load` lowers the original model again, checks its fingerprint against the saved one (a state from another
model is a StateError naming the first difference), and gives back the compressed model of the same kind as the
original: a torch module (its state_dict names are the user's) or an onnx.ModelProto.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StateError
from .ir.fingerprint import fingerprint, record_source  # noqa: F401  (record_source: re-exported)

FORMAT = "lowbit-compression-state"
VERSION = 1
VALUE_FACTS = ("torch_name", "torch_kind", "torch_transposed", "graph_input")


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    base = path.with_suffix("") if path.suffix.lower() in (".json", ".npz") else path
    return base.with_name(base.name + ".json"), base.with_name(base.name + ".npz")


def _compressed_graph(model: Any):
    from .api import lower
    from .frontends import graph_of

    graph = graph_of(model, fold_merged_bn=False)
    if graph is None:
        graph = lower(model)
    if not graph.meta.get("passes_run") and getattr(model, "lowbit_pruning", None) is None:
        raise StateError(f"this {type(model).__name__} was not compressed by lowbit (no pass ran on it): save what "
                         "lowbit.compile or lowbit.quantize returned")
    record_source(graph)
    return graph


def compression_state(model: Any) -> tuple[dict, dict[str, np.ndarray]]:
    """The compression state of `model` in memory: the JSON-able record `save` writes, and its constants by name
    (what `create_compressed_model(..., compression_state=...)` and `lowbit.save` keep)."""
    from . import __version__
    from .compiler import origin_target
    from .ir.text import print_graph

    graph = _compressed_graph(model)
    constants = list(graph.constants.values())
    facts = {v.name: {k: v.meta[k] for k in VALUE_FACTS if k in v.meta} for v in constants}
    state = {"format": FORMAT, "version": VERSION, "lowbit": __version__, "origin": origin_target(model),
             "passes": list(graph.meta.get("passes_run", [])), "options": graph.meta.get("pipeline_options", {}),
             "hw_config": graph.meta.get("hw_config"),
             "source": graph.meta["source"],
             "constants": [v.name for v in constants], "facts": {k: f for k, f in facts.items() if f},
             "graph": print_graph(graph)}
    controller = getattr(model, "lowbit_pruning", None)
    if controller is not None:  # a masked module (lowbit.prune(..., mode="mask")): its masks and schedule
        state["pruning_masks"] = controller.state()
    return state, {v.name: np.asarray(v.const) for v in constants}


def save(model: Any, path: str | os.PathLike) -> Path:
    """Write the compression state of `model` (what compile/quantize returned, trained or not) to
    `path`.json and `path`.npz; returns the .json path."""
    from .compiler import writable_parent

    json_path, npz_path = _paths(path)
    writable_parent(json_path)
    state, arrays = compression_state(model)
    np.savez(npz_path, **{f"c{i}": arrays[name] for i, name in enumerate(state["constants"])})
    json_path.write_text(json.dumps(state, indent=1))
    return json_path


def _read(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    json_path, npz_path = _paths(path)
    for p in (json_path, npz_path):
        if not p.is_file():
            raise StateError(f"no compression state at {str(p)!r}: pass the path lowbit.save was given")
    try:
        state = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateError(f"{str(json_path)!r} is not a lowbit compression state (not JSON: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise StateError(f"{str(json_path)!r} is not a lowbit compression state (format "
                         f"{state.get('format') if isinstance(state, dict) else None!r})")
    if state.get("version") != VERSION:
        raise StateError(f"{str(json_path)!r} is compression-state format version {state.get('version')!r}; this "
                         f"lowbit reads version {VERSION}: load it with the lowbit that wrote it "
                         f"({state.get('lowbit', '?')})")
    with np.load(npz_path, allow_pickle=False) as npz:
        names = state.get("constants", [])
        missing = [f"c{i}" for i in range(len(names)) if f"c{i}" not in npz.files]
        if missing:
            raise StateError(f"{str(npz_path)!r} lacks {len(missing)} of the {len(names)} arrays the state names")
        arrays = {name: npz[f"c{i}"] for i, name in enumerate(names)}
    return state, arrays


def _first_difference(saved: dict, found: dict) -> str | None:
    if [i[0] for i in saved["inputs"]] != [i[0] for i in found["inputs"]]:
        return f"its inputs are {[i[0] for i in found['inputs']]}, the saved model's {[i[0] for i in saved['inputs']]}"
    for name, spec in saved["weights"].items():
        if name not in found["weights"]:
            return f"it has no weight {name!r}"
        if found["weights"][name] != spec:
            got = found["weights"][name]
            return f"its weight {name!r} is {got[0]}{got[1]}, the saved model's {spec[0]}{spec[1]}"
    extra = sorted(set(found["weights"]) - set(saved["weights"]))
    if extra:
        return f"it has weights the saved model has not ({', '.join(extra[:3])})"
    return None


def load(model: Any, path: str | os.PathLike, *, example_inputs: Any = None) -> Any:
    """The compressed model `path` describes, rebuilt on `model`, the original (uncompressed) model it was made
    from: a torch module (example_inputs as lower takes them; a module lowbit returned needs none) or an ONNX
    model. No calibration runs; the outputs are the saved model's."""
    state, arrays = _read(path)
    return from_compression_state(model, state, arrays, example_inputs=example_inputs, where=str(_paths(path)[0]))


def from_compression_state(model: Any, state: dict, arrays: dict[str, np.ndarray], *, example_inputs: Any = None,
                           where: str = "the compression state") -> Any:
    """The compressed model `state` and `arrays` (from `compression_state`) describe, rebuilt on `model`."""
    from .api import lower
    from .compiler import _writeback, origin_target
    from .ir.text import parse_graph

    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise StateError(f"{where} is not a lowbit compression state of format version {VERSION}")
    if origin_target(model) != state["origin"]:
        raise StateError(f"the state was saved from a {state['origin']} model; {type(model).__name__} is a "
                         f"{origin_target(model)} model: load it onto the model it was made from")
    source = lower(model, example_inputs)
    difference = _first_difference(state["source"], fingerprint(source))
    if difference is not None:
        raise StateError(f"the state in {where!r} was saved from another model: {difference}")
    graph = parse_graph(state["graph"], constants=arrays)
    graph.meta = {**{k: v for k, v in source.meta.items() if k != "passes_run"}, "passes_run": list(state["passes"]),
                  "pipeline_options": state.get("options", {}), "source": state["source"]}
    if state.get("hw_config"):
        graph.meta["hw_config"] = state["hw_config"]
    for name, facts in state.get("facts", {}).items():
        if name in graph.constants:
            graph.constants[name].meta.update(facts)
    graph.verify()
    result = _writeback(graph, model)
    if state.get("pruning_masks"):
        from .frontends import graph_of
        from .pruning.masks import MaskController

        result.lowbit_pruning = MaskController.restore(result, graph_of(result), state["pruning_masks"])
    return result
