"""Calibration data from files, for the command line's `--data`: an .npz, or a folder of .npy files.

- `calib.npz`: one array per model input, keyed by the input's name, axis 0
  counting the samples (`np.savez("calib.npz", x=samples)`). A one-input
  model takes any single key.
- `calib/`: one `.npy` file per sample, in a subfolder named after each
  input (`calib/<input name>/*.npy`); the n-th file (in name order) of every
  subfolder makes the n-th sample. A one-input model may keep its files
  directly in `calib/`. A file holds one sample, with or without its batch
  dim of 1.

Sample i becomes one calibration item `{input name: array[i:i+1]}`: a batch
dim of 1, as NNCF takes items. Arrays keep the dtype they were saved with
(nothing is converted to float64), and items are views, not copies.

Everything is checked against the model's inputs before any work: a missing
input, an extra key or subfolder, a dtype or a shape that does not fit is a
CalibrationDataError naming the input, what it expects (symbolic dims by
name, unknown ones as ?) and what it got.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CalibrationDataError
from ..ir.graph import Graph, Value

__all__ = ["check_data_path", "describe", "load_calibration_arrays"]


def describe(value: Value) -> str:
    """`float32[batch,3,224,224]`: a graph input's dtype and shape, symbolic dims by name, unknown ones as ?."""
    if value.shape is None:
        return f"{value.dtype}[...]"
    dims = ",".join(str(d) if isinstance(d, (int, str)) else "?" for d in value.shape)
    return f"{value.dtype}[{dims}]"


def _got(array: np.ndarray) -> str:
    return f"{array.dtype.name}[{','.join(map(str, array.shape))}]"


def check_data_path(path: str | Path) -> Path:
    """`path`, if it can hold calibration data (an existing .npz file or folder); else CalibrationDataError."""
    path = Path(path)
    if not path.exists():
        raise CalibrationDataError(f"--data {str(path)!r} does not exist: give an .npz file or a folder of .npy "
                                   "files")
    if not path.is_dir() and path.suffix.lower() != ".npz":
        raise CalibrationDataError(f"--data {str(path)!r} is neither an .npz file nor a folder of .npy files")
    return path


def load_calibration_arrays(path: str | Path, graph: Graph, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """The calibration items in `path` for `graph`'s inputs, checked (see the module docstring).

    With `limit`, only the first `limit` samples are kept (and, from a folder, read).
    """
    path = check_data_path(path)
    names = [v.name for v in graph.inputs]
    if not names:
        raise CalibrationDataError(f"--data {str(path)!r}: the model has no inputs to calibrate")
    arrays = _read_folder(path, names, limit) if path.is_dir() else _read_npz(path, names)
    for value in graph.inputs:
        array = arrays[value.name]
        if value.shape is not None and array.ndim == len(value.shape) + 1 and array.shape[1:2] == (1,):
            arrays[value.name] = array = array[:, 0]  # samples saved with their batch dim of 1
        _check(path, value, array)
    counts = {name: len(arrays[name]) for name in names}
    if len(set(counts.values())) != 1:
        raise CalibrationDataError(f"--data {str(path)!r}: the inputs have different numbers of samples {counts}; "
                                   "give every input the same number")
    count = counts[names[0]] if limit is None else min(counts[names[0]], limit)
    if not count:
        raise CalibrationDataError(f"--data {str(path)!r} holds no samples (axis 0 is empty)")
    return [{name: arrays[name][i:i + 1] for name in names} for i in range(count)]


def _name_mismatch(path: Path, names: list[str], found: list[str], what: str) -> None:
    missing = [n for n in names if n not in found]
    extra = sorted(set(found) - set(names))
    if missing or extra:
        problems = ([f"no {what} for input(s) {missing}"] if missing else []) \
            + ([f"{what}(s) {extra} match no input"] if extra else [])
        raise CalibrationDataError(f"--data {str(path)!r}: the model's inputs are {names}; {'; '.join(problems)}. "
                                   f"Name one {what} after each input")


def _read_npz(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            if len(names) == 1 and len(keys) == 1:
                return {names[0]: npz[keys[0]]}
            _name_mismatch(path, names, keys, "array")
            return {k: npz[k] for k in names}
    except (OSError, ValueError, EOFError) as e:
        raise CalibrationDataError(f"--data {str(path)!r} cannot be read as .npz: {e}") from None


def _read_folder(path: Path, names: list[str], limit: int | None) -> dict[str, np.ndarray]:
    subfolders = sorted(p.name for p in path.iterdir() if p.is_dir() and any(p.glob("*.npy")))
    if len(names) == 1 and names[0] not in subfolders:
        folders = {names[0]: path}
    else:
        _name_mismatch(path, names, subfolders, "subfolder of .npy files")
        folders = {n: path / n for n in names}
    files = {n: sorted(f.glob("*.npy")) for n, f in folders.items()}
    for name, found in files.items():
        if not found:
            raise CalibrationDataError(f"--data {str(folders[name])!r} holds no .npy files for input {name!r}: give "
                                       f"one file per sample (or one subfolder per input name)")
    counts = {n: len(f) for n, f in files.items()}
    if len(set(counts.values())) != 1:
        raise CalibrationDataError(f"--data {str(path)!r}: the inputs have different numbers of .npy files "
                                   f"{counts}; give every input one file per sample")
    arrays = {}
    for name, found in files.items():
        samples = []
        for f in found[:limit]:
            try:
                samples.append(np.load(f, allow_pickle=False))
            except (OSError, ValueError, EOFError) as e:
                raise CalibrationDataError(f"--data {str(f)!r} cannot be read as .npy: {e}") from None
            if samples[-1].shape != samples[0].shape or samples[-1].dtype != samples[0].dtype:
                raise CalibrationDataError(
                    f"--data {str(folders[name])!r}: the .npy files for input {name!r} differ: {found[0].name} "
                    f"holds {_got(samples[0])}, {f.name} {_got(samples[-1])}; give one sample per file, all of one "
                    "shape and dtype")
        arrays[name] = np.stack(samples)
    return arrays


def _check(path: Path, value: Value, array: np.ndarray) -> None:
    """`array` holds the samples of `value` along axis 0."""
    shape = value.shape
    fits_shape = shape is None or (array.ndim == len(shape) and all(
        not isinstance(d, int) or d == s for d, s in zip(shape[1:], array.shape[1:])))
    if (value.dtype is not None and array.dtype.name != value.dtype) or not fits_shape:
        raise CalibrationDataError(f"--data {str(path)!r}: input {value.name!r} expects {describe(value)}, got "
                                   f"{_got(array)} (axis 0 counts the samples); save the data in the model's dtype "
                                   "and shape")
