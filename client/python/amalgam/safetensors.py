"""Safetensors (de)serialisation of ``dict[str, torch.Tensor]`` in memory.

Follows the Hugging Face format: an 8-byte little-endian header length, a
compact JSON header (``__metadata__`` first, tensors sorted by name) padded with
spaces to a multiple of 8 bytes, then the raw little-endian data. (Hugging
Face's own serializer orders tensors by descending dtype, then name: the same
bytes for a file of one dtype, another valid order for mixed dtypes.)
"""

from __future__ import annotations

import json
import struct
import sys
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch

_DTYPE_NAMES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}
_NAME_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
# numpy views of the raw bytes (bfloat16 has none: carried as int16 bits).
_RAW_VIEWS = {torch.float16: np.float16, torch.bfloat16: np.int16,
              torch.float32: np.float32, torch.float64: np.float64}

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("amalgam.safetensors needs a little-endian host")


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    t = tensor.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def dumps(tensors: Mapping[str, torch.Tensor],
          metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """Serialises ``tensors`` (F16/BF16/F32/F64) with an optional metadata map."""
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}; "
                            "expected float16, bfloat16, float32 or float64")
        data = _raw_bytes(tensor)
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype],
                        "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([struct.pack("<Q", len(text)), text] + blobs)


def loads(data: bytes) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Parses safetensors bytes into (tensors, metadata). Tensors are copies."""
    if len(data) < 8:
        raise ValueError("safetensors data shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", data[:8])
    if 8 + length > len(data):
        raise ValueError("safetensors header runs past the end of the data")
    header = json.loads(data[8:8 + length])
    metadata = header.pop("__metadata__", {}) or {}
    base = 8 + length
    tensors = {}
    for name, entry in header.items():
        dtype = _NAME_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        array = np.frombuffer(data, dtype=_RAW_VIEWS[dtype], count=(end - begin)
                              // np.dtype(_RAW_VIEWS[dtype]).itemsize,
                              offset=base + begin).copy()
        tensor = torch.from_numpy(array)
        if dtype == torch.bfloat16:
            tensor = tensor.view(torch.bfloat16)
        tensors[name] = tensor.reshape(entry["shape"])
    return tensors, dict(metadata)


def load_file(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Reads a safetensors file into (tensors, metadata)."""
    with open(path, "rb") as f:
        return loads(f.read())


def save_file(tensors: Mapping[str, torch.Tensor], path,
              metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes ``tensors`` to ``path`` as safetensors."""
    with open(path, "wb") as f:
        f.write(dumps(tensors, metadata))
