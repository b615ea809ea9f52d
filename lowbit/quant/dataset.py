"""`Dataset`: calibration data in the NNCF convention, and batching it for a graph's inputs.

    lowbit.Dataset(loader, transform_fn=lambda batch: batch[0])

`transform_fn(item)` returns what the model takes: for torch a tensor or a
tuple of tensors; for ONNX a dict of input name to array, or one array.
Items may be single samples or batches (dim 0 is the batch); `batches()`
concatenates consecutive items into batches of up to `batch_size` samples so
statistics are collected at full speed, and checks each item against the
graph's inputs, naming the item and input at fault.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from ..errors import DatasetError
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


def batches(graph: Graph, dataset: Dataset, subset_size: int, batch_size: int = 32) -> Iterator[list[np.ndarray]]:
    """Concatenated batches of the first `subset_size` items, as lists of arrays per graph input."""
    pending: list[list[np.ndarray]] = []
    samples = 0
    count = 0
    for index, item in enumerate(itertools.islice(dataset.get_inference_data(), subset_size)):
        arrays = item_arrays(graph, item, index)
        count += 1
        pending.append(arrays)
        samples += arrays[0].shape[0] if arrays[0].ndim else 1
        if samples >= batch_size:
            yield [np.concatenate(parts) for parts in zip(*pending)]
            pending, samples = [], 0
    if pending:
        yield [np.concatenate(parts) for parts in zip(*pending)]
    if count == 0:
        raise DatasetError("the calibration dataset is empty: give at least one item (NNCF uses 300)")
