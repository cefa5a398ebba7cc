"""safetensors files written tensor by tensor: host memory holds one slice of one tensor at a time.

safetensors' own `save_file` needs every tensor on the host at once (a GPU model's weights plus Adam's state:
~155 GB for OPT-13B). The format is simple enough to stream: an 8-byte little-endian header length, a JSON
header (each tensor's dtype, shape and byte range; `__metadata__`), then the raw bytes in that order. The header
needs only shapes and dtypes, so it is written first; each tensor is then copied to the host in slices of at
most CHUNK_BYTES (a tensor already on the host and contiguous is written from its own memory, no copy) and
hashed as it is written, so the file's SHA-256 costs no second read. The files are ordinary safetensors files:
`safetensors.torch.load_file` and `safe_open` read them, and read tensor by tensor with `safe_open`.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .safe_files import open_for_write

CHUNK_BYTES = 64 << 20  # a device tensor reaches the host in slices of this size
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None, fetch=None) -> tuple[int, str]:
    """Write `tensors` (on any device) to `path` as a safetensors file; returns (bytes, SHA-256) of the file.
    Never through a symbolic link (safe_files.open_for_write). `fetch(tensor)`: the tensor whose bytes are
    written, called once per tensor in order, after the header is written from their shapes and dtypes alone
    (an FSDP2 parameter: its DTensor describes it, and fetch gathers it whole when its turn comes)."""
    header, offset = {}, 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"{name}: cannot store a {tensor.dtype} tensor in a safetensors file")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads its header so the data starts 8-byte aligned
    digest, written = hashlib.sha256(), 0
    with open_for_write(path, "wb") as handle:
        for piece in (struct.pack("<Q", len(text)), text):
            handle.write(piece)
            digest.update(piece)
            written += len(piece)
        for tensor in tensors.values():
            for chunk in host_chunks(tensor if fetch is None else fetch(tensor)):
                view = chunk.numpy().data
                handle.write(view)
                digest.update(view)
                written += view.nbytes
    return written, digest.hexdigest()


@torch.no_grad()
def host_chunks(tensor: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> Iterable[torch.Tensor]:
    """The tensor's bytes as host uint8 tensors of at most `chunk_bytes` (a host tensor: views of itself)."""
    flat = tensor.detach().reshape(-1)  # a non-contiguous tensor is made contiguous where it lives
    if flat.numel() == 0:
        return
    if flat.device.type == "cpu":
        yield flat.contiguous().view(torch.uint8)
        return
    yield from slices_to_host(flat, chunk_bytes)


def slices_to_host(flat: torch.Tensor, chunk_bytes: int) -> Iterable[torch.Tensor]:
    """A 1-d tensor's bytes copied to the host a slice of at most `chunk_bytes` at a time."""
    step = max(chunk_bytes // flat.element_size(), 1)
    for start in range(0, flat.numel(), step):
        yield flat[start: start + step].to("cpu").view(torch.uint8)
