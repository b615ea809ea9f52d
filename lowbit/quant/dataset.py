"""`Dataset`: calibration data in the NNCF convention, and batching it for a graph's inputs.

    lowbit.Dataset(loader, transform_fn=lambda batch: batch[0])

`transform_fn(item)` returns what the model takes: for torch a tensor or a
tuple of tensors; for ONNX a dict of input name to array, or one array.
Items may be single samples or batches (dim 0 is the batch).

`CalibrationData` reads the first `subset_size` items of a dataset once,
lazily, and keeps them: capturing a torch model (item 0), smooth_quant,
quantize and fast_bias_correction all see the same items, so a one-shot
iterable (a generator) works, and `transform_fn` runs once per item. Every
item is checked as it is read: NaN or inf is a DatasetError naming the item.

`batches()` checks each item against the graph's inputs (naming the item and
input at fault), then groups consecutive items of the same shapes into
batches of up to `batch_size` samples so statistics are collected at full
speed. Items of different shapes (natural-length text) are never
concatenated. A graph input with a static batch dim (an ONNX model exported
with `x: [1, 3, 224, 224]`) gets batches of exactly that many samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from ..errors import DatasetError, OptionError
from ..ir.graph import Graph


class Dataset:
    """Calibration data: an iterable of items and a function that turns an item into model inputs."""

    def __init__(self, data_source: Iterable, transform_fn: Callable[[Any], Any] | None = None):
        self.data_source = data_source
        self.transform_fn = transform_fn

    def get_data(self, indices=None) -> Iterator:
        return iter(self.data_source)

    def get_inference_data(self, indices=None) -> Iterator:
        for index, item in enumerate(self.data_source):
            yield self.transform(item, index)

    def transform(self, item: Any, index: int) -> Any:
        if self.transform_fn is None:
            return item
        try:
            return self.transform_fn(item)
        except Exception as e:
            raise DatasetError(f"transform_fn raised {type(e).__name__} on dataset item {index}: {e}. Fix the "
                               "transform_fn: it must turn one item into the model's input") from e

    def __iter__(self):
        return self.get_inference_data()


def as_dataset(data: Any) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if data is None:
        raise DatasetError("quantization needs calibration data: pass dataset=lowbit.Dataset(...)")
    if hasattr(data, "get_inference_data"):  # an nncf.Dataset
        return Dataset(data.get_inference_data())
    if not hasattr(data, "__iter__") or isinstance(data, (str, bytes)):
        raise DatasetError(f"the calibration dataset is a {type(data).__name__}: pass lowbit.Dataset(items), "
                           "items being a list, a generator or a data loader of the model's inputs")
    return Dataset(data)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _describe(v) -> str:
    dims = ",".join("?" if d is None else str(d) for d in v.shape) if v.shape is not None else "..."
    return f"{v.dtype}[{dims}]"


def item_arrays(graph: Graph, item: Any, index: int) -> list[np.ndarray]:
    """The model inputs of one transformed item, as numpy arrays in graph-input order, checked."""
    inputs = graph.inputs
    if isinstance(item, dict):
        missing = [v.name for v in inputs if v.name not in item]
        if missing:
            raise DatasetError(f"dataset item {index}: no array for input {missing[0]!r} (got keys "
                               f"{sorted(item)}); return a dict with every input name")
        arrays = [_to_numpy(item[v.name]) for v in inputs]
    else:
        parts = list(item) if isinstance(item, (tuple, list)) else [item]
        if len(parts) != len(inputs):
            raise DatasetError(f"dataset item {index}: the model takes {len(inputs)} input(s) "
                               f"({', '.join(v.name for v in inputs)}), the item gives {len(parts)}; "
                               "use transform_fn to select the model input")
        arrays = [_to_numpy(p) for p in parts]
    for v, a in zip(inputs, arrays):
        problem = None
        if v.dtype is not None and a.dtype.name != v.dtype:
            problem = f"dtype {a.dtype.name}"
        elif v.shape is not None and (a.ndim != len(v.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(v.shape[1:], a.shape[1:]))):
            problem = f"shape {tuple(a.shape)}"
        if problem:
            raise DatasetError(f"dataset item {index}: input {v.name!r} expected {_describe(v)}, got "
                               f"{a.dtype.name}{list(a.shape)} ({problem} does not match); fix transform_fn "
                               "or the data")
    return arrays


def check_subset_size(subset_size: Any) -> int:
    """`subset_size` as a positive int, or an OptionError."""
    if isinstance(subset_size, bool) or not isinstance(subset_size, (int, np.integer)) or subset_size < 1:
        raise OptionError(f"subset_size must be a positive int (the number of calibration items to use; NNCF's "
                          f"default is 300), got {subset_size!r}")
    return int(subset_size)


def _leaves(x: Any, path: str = ""):
    """(path, array-like) for every tensor or array in an item (tuples, lists and dicts walked)."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{path}[{k!r}]")
    elif isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{path}[{i}]")
    elif hasattr(x, "detach") or isinstance(x, np.ndarray):
        yield path, x


def check_finite(item: Any, index: int) -> None:
    """DatasetError naming the item (and where in it) when a float tensor of `item` holds NaN or inf."""
    for path, x in _leaves(item):
        a = _to_numpy(x) if hasattr(x, "detach") else x
        if a.dtype.kind not in "fc" and a.dtype.name != "bfloat16":
            continue
        a = a.astype(np.float32) if a.dtype.kind == "f" and a.dtype.itemsize < 4 else a
        finite = np.isfinite(a)
        if not finite.all():
            nan, total = int(np.isnan(a).sum()), a.size
            inf = total - int(finite.sum()) - nan
            where = f" at {path}" if path else ""
            raise DatasetError(f"dataset item {index}{where} holds {nan} NaN and {inf} inf value(s) of {total}: "
                               "calibration statistics need finite data. Remove the item or fix it in transform_fn "
                               "(e.g. np.nan_to_num)")


class CalibrationData:
    """The first `subset_size` transformed items of a dataset, read once (lazily) and shared by every consumer."""

    def __init__(self, dataset: Any, subset_size: int = 300):
        self.dataset = as_dataset(dataset)
        self.subset_size = check_subset_size(subset_size)
        self._items: list[Any] = []
        self._source: Iterator | None = None
        self._exhausted = False

    def _pull(self, count: int) -> None:
        count = min(count, self.subset_size)
        while len(self._items) < count and not self._exhausted:
            if self._source is None:
                self._source = iter(self.dataset.get_data())
            try:
                raw = next(self._source)
            except StopIteration:
                self._exhausted = True
                break
            index = len(self._items)
            item = self.dataset.transform(raw, index)
            check_finite(item, index)
            self._items.append(item)

    def first(self) -> Any:
        """Item 0, transformed (what a torch model is captured with); DatasetError when there is none."""
        self._pull(1)
        if not self._items:
            raise DatasetError(EMPTY)
        return self._items[0]

    def items(self) -> list[Any]:
        """The first `subset_size` items, transformed and checked; DatasetError when there is none."""
        self._pull(self.subset_size)
        if not self._items:
            raise DatasetError(EMPTY)
        return self._items


EMPTY = "the calibration dataset is empty: give at least one item (NNCF uses 300)"


def calibration_data(dataset: Any, subset_size: int = 300) -> CalibrationData:
    """`dataset` itself when it is CalibrationData, else the first `subset_size` items of it, read once."""
    if isinstance(dataset, CalibrationData):
        return dataset
    return CalibrationData(dataset, subset_size)


# Samples per calibration run. Statistics are per sample, so the batch changes only speed: 8 keeps a big CNN's
# tapped activations in memory that is reused (ResNet-50 from ONNX, 64 images: 2.5-2.7 s at 8, 4.9-9.2 s at 32;
# BERT-base 7.3-8.5 s at 8, 8.1-13.4 s at 32).
CALIBRATION_BATCH = 8


def batch_mode(graph: Graph) -> int | str:
    """How items may be batched for `graph`: "any" (every input has a dynamic dim 0), an int B (every input
    has the static dim 0 B: batches of exactly B samples), or "as_is" (anything else: items fed one by one).

    A graph with control flow (If/Loop/Scan) gets its items as they are: a condition may read the whole
    batch (If(ReduceMean(x) > 0)), and a batch of several items would take one branch for all of them."""
    if any(next(n.subgraphs(), None) is not None for n in graph):
        return "as_is"
    dims = [v.shape[0] if v.shape else None for v in graph.inputs]
    if any(v.shape is not None and len(v.shape) == 0 for v in graph.inputs):
        return "as_is"
    static = {d for d in dims if isinstance(d, int)}
    if not static:
        return "any"
    if len(static) == 1 and all(isinstance(d, int) for d in dims):
        return static.pop()
    return "as_is"


def _group_key(arrays: list[np.ndarray]):
    """What items must share to be concatenated: every dim but the batch's, dtypes, one batch size across inputs."""
    if any(a.ndim == 0 for a in arrays) or len({a.shape[0] for a in arrays}) != 1:
        return None  # cannot be split or joined along dim 0: fed as it is
    return tuple((a.shape[1:], a.dtype.str) for a in arrays)


def batches(graph: Graph, data: Any, subset_size: int | None = None,
            batch_size: int = CALIBRATION_BATCH) -> Iterator[list[np.ndarray]]:
    """Batches of the calibration items, as lists of arrays per graph input (every item checked first).

    Consecutive items of the same shapes are concatenated up to `batch_size`
    samples; items of different shapes never are. When every graph input has
    the static batch dim B, every batch has exactly B samples (items are split
    or joined; a last group short of B is filled up by repeating its own
    samples). Items are fed one by one, as they are, to a graph whose inputs
    disagree on dim 0. `data` is CalibrationData, or a dataset whose first
    `subset_size` items are read.
    """
    data = calibration_data(data, subset_size if subset_size is not None else 300)
    items = [item_arrays(graph, item, index) for index, item in enumerate(data.items())]
    mode = batch_mode(graph)
    if mode == "as_is":
        for index, arrays in enumerate(items):
            for v, a in zip(graph.inputs, arrays):
                if v.shape and a.ndim and isinstance(v.shape[0], int) and a.shape[0] != v.shape[0]:
                    raise DatasetError(f"dataset item {index}: input {v.name!r} expected {_describe(v)}, got "
                                       f"{a.dtype.name}{list(a.shape)} (its batch dim is fixed at {v.shape[0]}); "
                                       "fix transform_fn or the data")
        yield from items
        return
    fixed = mode if isinstance(mode, int) else None
    target = fixed if fixed is not None else max(int(batch_size), 1)
    pending: list[list[np.ndarray]] = []
    samples = 0
    key = None

    def flush():
        nonlocal samples
        if not pending:
            return
        joined = [np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in zip(*pending)]
        pending.clear()
        samples = 0
        if fixed is None:
            yield joined
            return
        for start in range(0, joined[0].shape[0], fixed):
            chunk = [a[start:start + fixed] for a in joined]
            have = chunk[0].shape[0]
            if have < fixed:  # fill the last batch with its own samples again
                chunk = [np.concatenate([c] * -(-fixed // have))[:fixed] for c in chunk]
            yield chunk

    for arrays in items:
        k = _group_key(arrays)
        if k is None:
            yield from flush()
            key = None
            yield arrays
            continue
        if k != key:
            yield from flush()
            key = k
        pending.append(arrays)
        samples += arrays[0].shape[0]
        if samples >= target and (fixed is None or samples % fixed == 0):
            yield from flush()
    yield from flush()
