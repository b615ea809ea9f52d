"""Calibration data from files, for the command line: an .npz, or a folder of .npy files.

- `calib.npz`: one array per model input, named as the input, first axis =
  samples (a one-input model takes any single array name).
- `calib/`: for a one-input model, one `.npy` file per sample (with or without
  its batch dim of 1), read in name order; for several inputs, one subfolder
  per input name holding as many files each, paired by name order.

Each sample becomes one calibration item with a batch dim of 1 (NNCF's
convention), as a dict {input name: array}. Arrays keep their dtype. Every
array is checked against the model's inputs before any work: a missing or
extra input, a dtype or a shape that does not fit is a CalibrationDataError
naming the input, what it expects and what it got.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CalibrationDataError
from ..ir.graph import Graph, Value


def describe(value: Value) -> str:
    dims = ",".join("?" if not isinstance(d, int) else str(d) for d in value.shape or ())
    return f"{value.dtype}[{dims}]"


def load_calibration_arrays(path: str | Path, graph: Graph) -> list[dict[str, np.ndarray]]:
    """The calibration items in `path` for `graph`'s inputs, checked (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise CalibrationDataError(f"--data {str(path)!r} does not exist: give an .npz file or a folder of .npy")
    names = [v.name for v in graph.inputs]
    arrays = _read_folder(path, names) if path.is_dir() else _read_npz(path, names)
    for value in graph.inputs:
        array = arrays[value.name]
        if value.shape is not None and array.ndim == len(value.shape) + 1 and array.shape[1] == 1:
            arrays[value.name] = array = array[:, 0]  # files that kept their batch dim of 1
        _check(path, value, array)
    counts = {name: len(a) for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise CalibrationDataError(f"--data {str(path)!r}: the inputs have different numbers of samples {counts}; "
                                   "give every input the same number")
    if not next(iter(counts.values())):
        raise CalibrationDataError(f"--data {str(path)!r} holds no samples")
    return [{name: arrays[name][i:i + 1] for name in names} for i in range(next(iter(counts.values())))]


def _read_npz(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    if path.suffix.lower() != ".npz":
        raise CalibrationDataError(f"--data {str(path)!r} is neither an .npz file nor a folder of .npy files")
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as e:
        raise CalibrationDataError(f"--data {str(path)!r} cannot be read as .npz: {e}") from None
    if len(names) == 1 and len(found) == 1:
        return {names[0]: next(iter(found.values()))}
    extra = sorted(set(found) - set(names))
    missing = [n for n in names if n not in found]
    if missing or extra:
        raise CalibrationDataError(f"--data {str(path)!r}: the model's inputs are {names}; "
                                   + (f"no array for {missing}" if missing else "")
                                   + ("; " if missing and extra else "")
                                   + (f"arrays {extra} match no input" if extra else "")
                                   + ". Name one array after each input")
    return found


def _read_folder(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    folders = {names[0]: path} if len(names) == 1 else {n: path / n for n in names}
    missing = [n for n, f in folders.items() if not f.is_dir()]
    if missing:
        raise CalibrationDataError(f"--data {str(path)!r}: the model has inputs {names}; a folder of .npy for "
                                   f"several inputs needs one subfolder per input, and {missing} are missing")
    arrays = {}
    for name, folder in folders.items():
        files = sorted(folder.glob("*.npy"))
        if not files:
            raise CalibrationDataError(f"--data {str(folder)!r} holds no .npy files for input {name!r}")
        samples = [np.load(f, allow_pickle=False) for f in files]
        shapes = {s.shape for s in samples}
        if len(shapes) != 1:
            raise CalibrationDataError(f"--data {str(folder)!r}: the .npy files for input {name!r} have different "
                                       f"shapes {sorted(shapes)}; give one sample per file, all of one shape")
        arrays[name] = np.stack(samples)
    return arrays


def _check(path: Path, value: Value, array: np.ndarray) -> None:
    """`array` holds the samples of `value` along axis 0."""
    shape = value.shape
    fits_shape = shape is None or (array.ndim == len(shape) and all(
        not isinstance(d, int) or d == s for d, s in zip(shape[1:], array.shape[1:])))
    if array.dtype.name != value.dtype or not fits_shape:
        raise CalibrationDataError(f"--data {str(path)!r}: input {value.name!r} expects {describe(value)}, got "
                                   f"{array.dtype.name}{list(array.shape)} (axis 0 counts the samples); convert "
                                   "the data to what the model takes")
