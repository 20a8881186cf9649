"""Reading safetensors files into freshly allocated tensors, one tensor at a time, without mapping the file.

    header = read_header(path)                     # {name: (dtype, shape, begin, end)}, metadata
    for name, tensor in read_tensors(path, dtype=torch.bfloat16): ...
    for name, rows in read_rows(path, {"img_in.weight": (0, 64)}): ...   # a slice of dim 0 only

Why not `safetensors.safe_open(...).get_tensor`: it hands out tensors that live in the file's memory map, at
whatever alignment the header length leaves them (16, 24, … bytes), and CPU matmul kernels round differently at
different alignments, so the same weights read from two files gave outputs 1e-7 apart. Here every tensor is a
torch allocation (64-byte aligned) filled by `readinto`: the same weights give the same numbers whatever file they
came from, and a bf16 model costs its own size in RAM (page cache is not mapped into the process). The header
format is safetensors' documented one: an 8-byte little-endian length, then JSON.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 * 2**20  # safetensors' own cap on the JSON header


def read_header(path: str | Path) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...], int, int]], dict]:
    """Tensor entries {name: (dtype, shape, begin, end)} (byte offsets from the start of the file) and the
    file's `__metadata__`. A file shorter than its header says (a copy or download cut short) is refused here,
    before anything is loaded."""
    with open(path, "rb", buffering=0) as f:  # unbuffered: each tensor is one read() straight into its memory
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is truncated or not a safetensors file ({size} bytes: no header length)")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER:
            raise ValueError(f"{path} is truncated or not a safetensors file (header length {length})")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise ValueError(f"{path} is truncated or not a safetensors file (unreadable header)") from None
    metadata = header.pop("__metadata__", None) or {}
    entries = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which lensforge does not read")
        begin, end = info["data_offsets"]
        numel = 1
        for side in info["shape"]:
            numel *= side
        if end - begin != numel * DTYPES[info["dtype"]].itemsize:
            raise ValueError(f"{path}: tensor {name} has {end - begin} bytes for shape {info['shape']}")
        entries[name] = (DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + begin, 8 + length + end)
    needed = max((e[3] for e in entries.values()), default=8 + length)
    if size < needed:
        raise ValueError(f"{path} is truncated or not a safetensors file ({size:,} bytes, its header needs "
                         f"{needed:,})")
    return entries, metadata


def read_tensors(path: str | Path, dtype: torch.dtype | None = None, device=None,
                 names=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the file (or those in `names`), in file order; each read into its own
    allocation, then cast to `dtype` and moved to `device` when asked."""
    entries, _ = read_header(path)
    wanted = {name: None for name in entries if names is None or name in names}
    yield from read_rows(path, wanted, dtype, device)


def read_rows(path: str | Path, wanted: dict[str, tuple[int, int] | None], dtype: torch.dtype | None = None,
              device=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, rows start:stop of dim 0) for each `wanted` name (None: the whole tensor), in file order. Only those
    bytes are read (rows are contiguous in safetensors' row-major layout): one FSDP rank reads its own shard."""
    entries, _ = read_header(path)
    with open(path, "rb", buffering=0) as f:  # unbuffered: each tensor is one read() straight into its memory
        for name, (stored, shape, begin, end) in sorted(entries.items(), key=lambda e: e[1][2]):
            if name not in wanted:
                continue
            rows = wanted[name]
            if rows is not None and shape:
                start, stop = rows
                row_bytes = (end - begin) // shape[0] if shape[0] else 0
                shape, begin, end = (stop - start, *shape[1:]), begin + start * row_bytes, begin + stop * row_bytes
            tensor = torch.empty(shape, dtype=stored)
            if end > begin:
                raw = tensor.reshape(-1).view(torch.uint8)
                raw.zero_()  # fault the fresh pages in with torch's threads: inside read() it is one page at a time
                f.seek(begin)
                view = memoryview(raw.numpy())
                if f.readinto(view) != end - begin:  # cut after its header was read
                    raise ValueError(f"{path} is truncated or not a safetensors file (at tensor {name})")
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            yield name, tensor.to(device) if device is not None else tensor
