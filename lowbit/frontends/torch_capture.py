"""Capturing an nn.Module with torch.export: at a batch the model accepts, without touching the model.

- **Batch.** lowbit asks for a dynamic batch (dim 0 of every tensor input), and
  widens an example of batch 1 to 2 so that torch.export does not specialize it.
  A model that only runs at its own batch (`x.reshape(1, -1)`), or whose
  forward() branches on the batch size (`if x.shape[0] > 4`), is captured again
  statically at the example's own batch: a dynamic capture of it would run the
  wrong code at other batches. `Captured.fixed_batch` then says why, so that
  what lowbit writes refuses other batches (see torch_guard.py).
- **Errors.** A failure is a CaptureError that names the model class, torch's
  reason, the line of forward() at fault where torch gives it, and what to
  change. Data-dependent control flow (`if x.sum() > 0:`) is told apart: no
  example input can fix it (`CaptureError.blames_inputs` is False).
- **Threads and the user's model.** torch.export is not thread-safe and, in
  non-strict mode, swaps the parameters of the module it traces for fake
  tensors while it runs. Every capture holds `EXPORT_LOCK`, and traces a
  structural copy of the module (its own module objects and parameter dicts,
  sharing the parameter tensors), so the user's modules, their parameters and
  their training flags are never touched, and no process-wide state (warnings
  filters included) is changed.
"""

from __future__ import annotations

import copy
import re
import threading
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CaptureError, MissingExampleInputsError

EXPORT_LOCK = threading.RLock()  # torch.export keeps global tracing state: one capture at a time per process


@dataclass
class Captured:
    """An exported program, and why its batch is fixed (None when dim 0 is dynamic)."""

    program: torch.export.ExportedProgram
    fixed_batch: str | None = None


def as_example_tuple(example_inputs: Any) -> Any:
    """A tensor or list of inputs as the tuple torch.export takes; anything else unchanged."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return example_inputs


def _example_args(model: torch.nn.Module, example_inputs: Any) -> tuple:
    if example_inputs is None:
        raise MissingExampleInputsError(
            f"lowbit needs example inputs to capture {type(model).__name__}: pass example_inputs=(tensor, ...) "
            "with the shapes and dtypes the model takes (any batch size)")
    args = as_example_tuple(example_inputs)
    if not isinstance(args, tuple):
        raise MissingExampleInputsError(f"example_inputs must be a tensor or a tuple of them, not "
                                        f"{type(example_inputs).__name__}")
    return args


def capture(model: torch.nn.Module, example_inputs: Any) -> torch.export.ExportedProgram:
    """torch.export `model` with dim 0 of every tensor input dynamic where the model allows it."""
    return capture_program(model, example_inputs).program


def capture_program(model: torch.nn.Module, example_inputs: Any, dynamic_dims: Any = None) -> Captured:
    """torch.export `model` (never changed) for inference, at the batch it accepts (see the module doc).

    `dynamic_dims` (one collection of axes per example input) are captured dynamic too where the model
    allows it (a sentence length); where it does not, the capture is the one without them."""
    args = _example_args(model, example_inputs)
    with EXPORT_LOCK:
        traced = inference_view(model)
        extra = _extra_dims(args, dynamic_dims)
        if extra:
            try:
                captured = _export_at_accepted_batch(traced, args, type(model).__name__, extra)
                if captured.fixed_batch is None:
                    return captured
            except CaptureError:
                pass  # the model fixes those dims: captured as before, and items of other sizes are refused
        return _export_at_accepted_batch(traced, args, type(model).__name__)


def _extra_dims(args: tuple, dynamic_dims: Any) -> tuple:
    """Per example input, the axes besides the batch to capture dynamic: () when there are none."""
    if not dynamic_dims:
        return ()
    extra = []
    for a, dims in zip(args, list(dynamic_dims) + [()] * (len(args) - len(dynamic_dims))):
        dims = sorted({int(d) % a.dim() for d in dims or ()} - {0}) if _batched(a) else []
        extra.append([d for d in dims if a.shape[d] > 1])  # torch.export specializes sizes 0 and 1
    return tuple(extra) if any(extra) else ()


# -- the user's model stays untouched ---------------------------------------------------

def inference_view(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of `model` in eval mode: new module objects and parameter/buffer dicts, the same
    tensors. torch.export may swap entries of the copy's dicts; the user's modules never see it."""
    try:
        return _clone_tree(model, {})
    except Exception:  # a module that cannot be copied this way: a deep copy, as before
        return copy.deepcopy(model).eval()


def _clone_tree(module: torch.nn.Module, memo: dict[int, torch.nn.Module]) -> torch.nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    clone = copy.copy(module)
    memo[id(module)] = clone
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {name: None if sub is None else _clone_tree(sub, memo) for name, sub in module._modules.items()}
    clone.training = False
    return clone


# -- the batch the model accepts --------------------------------------------------------

def _widened(args: tuple) -> tuple:
    """torch.export specializes a dim whose example size is 0 or 1: a batch of 1 is doubled to stay dynamic."""
    return tuple(torch.cat([a, a]) if _batched(a) and a.shape[0] == 1 else a for a in args)


def _batched(a: Any) -> bool:
    return isinstance(a, torch.Tensor) and a.dim() > 0


def _dynamic_batch(args: tuple, extra: tuple = ()) -> tuple:
    extra = list(extra) + [()] * (len(args) - len(extra))
    return tuple({d: torch.export.Dim.AUTO for d in (0, *dims)} if _batched(a) else None
                 for a, dims in zip(args, extra))


def _export_at_accepted_batch(model: torch.nn.Module, args: tuple, name: str, extra: tuple = ()) -> Captured:
    """A dynamic capture where the model allows it, else a static one at the example's own batch."""
    try:
        program = torch.export.export(model, _widened(args), dynamic_shapes=_dynamic_batch(args, extra))
    except Exception as e:
        if data_dependent(e):
            raise capture_error(name, e) from e
        why = f"torch.export could not capture it with a dynamic batch ({_reason(e)})"
    else:
        why = batch_constraint(program, args)
        if why is None:
            return Captured(program)
    try:
        program = torch.export.export(model, args)
    except Exception as e:
        raise capture_error(name, e) from e
    return Captured(program, why)


def batch_constraint(program: torch.export.ExportedProgram, args: tuple) -> str | None:
    """Why dim 0 cannot stay dynamic in `program` (torch specialized it, or bounded its range); None if it can."""
    user = set(program.graph_signature.user_inputs)
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user]
    for node, arg in zip(inputs, torch.utils._pytree.tree_leaves(args)):
        val = node.meta.get("val")
        if not _batched(arg) or not isinstance(val, torch.Tensor) or val.dim() == 0:
            continue
        dim = val.shape[0]
        if isinstance(dim, int):
            return f"torch.export fixed its batch to {dim}"
        expr = getattr(dim.node, "expr", None)
        bounds = program.range_constraints.get(expr)
        lower, upper = (_finite(bounds.lower), _finite(bounds.upper)) if bounds is not None else (None, None)
        if (lower or 0) > 2 or upper is not None:
            span = f"{lower}..{upper}" if upper is not None else f">= {lower}"
            return f"its forward() depends on the batch size (torch.export bounds it to {span})"
    return None


def _finite(bound: Any) -> int | None:
    """A range bound as an int; None for an infinite one (torch's int_oo)."""
    from torch.utils._sympy.numbers import IntInfinity, NegativeIntInfinity

    if isinstance(bound, (IntInfinity, NegativeIntInfinity)) or not getattr(bound, "is_finite", True):
        return None
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


# -- errors -------------------------------------------------------------------------------

def data_dependent(e: BaseException) -> bool:
    """True if torch.export failed on control flow that depends on tensor values (`if x.sum() > 0:`)."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, GuardOnDataDependentSymNode) or "data-dependent" in str(e).split("\n", 1)[0]:
            return True
        e = e.__cause__ or e.__context__
    return False


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _where(e: BaseException) -> str:
    """' (at File "m.py", line 12, in forward: if x.sum() > 0:)' from torch's message, or ''."""
    lines = str(e).splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "The following call raised this error:" and i + 1 < len(lines):
            where = lines[i + 1].strip()
            code = lines[i + 2].strip() if i + 2 < len(lines) else ""
            return f" (at {where}{': ' + code if code else ''})" if where else ""
    return ""


def _unknown_output_type(e: BaseException) -> str | None:
    """The class torch.export found in the model's output and cannot flatten ("Found <class 'X'> in output")."""
    match = re.search(r"Found <class '([\w.]+)'> in output", str(e))
    return match.group(1) if match else None


def capture_error(name: str, e: BaseException) -> CaptureError:
    """The CaptureError for torch.export's failure `e` on model class `name`."""
    output_type = _unknown_output_type(e)
    if output_type is not None:
        cache = "cache_utils" in output_type
        error = CaptureError(
            f"torch.export could not capture {name}: its forward() returns a {output_type}, which torch cannot "
            "flatten into tensors. "
            + ("It is transformers' key/value cache: build the model with use_cache=False "
               "(config.use_cache = False, or from_pretrained(..., use_cache=False)), " if cache else
               "Make forward() return tensors (or tuples/dicts of them), ")
            + "or wrap the model in a module whose forward() returns only the tensors you need")
        error.blames_inputs = False
        return error
    if data_dependent(e):
        error = CaptureError(
            f"torch.export could not capture {name}: its forward() branches on the values of a tensor "
            f"(data-dependent control flow){_where(e)}. torch's reason: {_reason(e)}. No example input can fix "
            "this: rewrite the branch with torch.cond or torch.where, or move it out of forward(); or export the "
            "model to ONNX yourself and pass the .onnx file")
        error.blames_inputs = False
        return error
    error = CaptureError(
        f"torch.export could not capture {name}: {_reason(e)}{_where(e)}. Check that example_inputs (or the first "
        "dataset item) match what forward() takes; data-dependent Python control flow must be rewritten with "
        "torch.cond or removed; alternatively export the model to ONNX and pass the .onnx file.")
    error.blames_inputs = True
    return error
