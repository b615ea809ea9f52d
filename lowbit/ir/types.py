"""Element types and shapes of IR values, and their mapping to ONNX (and to torch's names).

A dtype is a lowercase name (`"float32"`, `"int64"`, `"bool"`, ...), the same
names numpy uses; `None` means not known. A shape is a tuple whose entries are
ints (static), strings (symbolic, e.g. `"batch"`) or `None` (unknown); a shape
of `None` means the rank is not known.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

Dim = int | str | None
Shape = tuple[Dim, ...] | None

_ONNX = {
    "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
    "float64": TensorProto.DOUBLE, "int8": TensorProto.INT8, "uint8": TensorProto.UINT8,
    "int16": TensorProto.INT16, "uint16": TensorProto.UINT16, "int32": TensorProto.INT32,
    "uint32": TensorProto.UINT32, "int64": TensorProto.INT64, "uint64": TensorProto.UINT64,
    "bool": TensorProto.BOOL, "string": TensorProto.STRING, "complex64": TensorProto.COMPLEX64,
    "complex128": TensorProto.COMPLEX128, "int4": TensorProto.INT4, "uint4": TensorProto.UINT4,
    "float8e4m3fn": TensorProto.FLOAT8E4M3FN, "float8e5m2": TensorProto.FLOAT8E5M2,
}
_FROM_ONNX = {v: k for k, v in _ONNX.items()}

DTYPES = frozenset(_ONNX)


def to_onnx_dtype(dtype: str | None) -> int:
    return TensorProto.UNDEFINED if dtype is None else _ONNX[dtype]


def from_onnx_dtype(elem_type: int) -> str | None:
    return _FROM_ONNX.get(elem_type)


def numpy_dtype_name(array: np.ndarray) -> str:
    name = array.dtype.name
    return "string" if array.dtype.kind in "OSU" else name


def from_torch_dtype(torch_dtype) -> str:
    return str(torch_dtype).removeprefix("torch.")


def is_float(dtype: str | None) -> bool:
    return dtype is not None and dtype.startswith(("float", "bfloat"))
