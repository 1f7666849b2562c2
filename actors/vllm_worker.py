"""Worker side of `VLLMEngine`'s weight reload under tensor parallelism (`actor.tensor_parallel_size > 1`).

With TP > 1 each shard is a vLLM worker in a process of its own (the "mp" executor), so the
in-process path — handing the worker an iterator of tensors — cannot reach it: collective_rpc
pickles its arguments, and on this vLLM version tensors sent that way do not arrive. Instead the
engine names a file that holds the whole flat weight buffer (the version's /dev/shm file, or a copy
it writes) and where each tensor sits in it; every worker maps that file read-only and feeds views
of it to vLLM's layerwise in-place `reload_weights`, which takes each shard's slice through the
model's own weight loaders. The bytes are read straight from the page cache: no pickling, no copy
per worker.

`WeightFileLoader` is given to vLLM as `worker_extension_cls` (by qualified name, so this module is
imported in the worker processes, which must not pull in anything heavy at import).
"""

from __future__ import annotations

import mmap
import os
from typing import Any

TensorEntry = tuple[str, str, list[int], int, int]
"""(checkpoint name, wire dtype tag, shape, byte offset, nbytes) of one tensor in the file."""


class FileChanged(OSError):
    """The file at the path is not the one the engine named (its version was dropped meanwhile)."""


def map_file(path: str, file_id: str = "") -> Any:
    """The file read-only as a flat uint8 numpy array; FileChanged when it is not `file_id`
    ("device:inode"), OSError when it is gone."""
    import numpy as np

    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if file_id and f"{st.st_dev}:{st.st_ino}" != file_id:
            raise FileChanged(f"{path} is no longer the weight file {file_id}")
        if not st.st_size:
            return np.empty(0, dtype=np.uint8)
        return np.frombuffer(mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ), dtype=np.uint8)
    finally:
        os.close(fd)


def file_tensors(buf: Any, entries: list[TensorEntry]) -> list[tuple[str, Any]]:
    """Zero-copy torch views of `buf` (see `map_file`) for each entry; ValueError when one lies
    outside the file or its size does not match its shape and dtype."""
    import numpy as np

    from actors.weights_io import wire_tensor
    from bus.codec import numpy_dtype

    out = []
    for name, tag, shape, offset, nbytes in entries:
        dt = numpy_dtype(tag)
        want = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if offset < 0 or offset + nbytes > buf.size or nbytes != want:
            raise ValueError(f"{name}: {nbytes} bytes at {offset} do not fit the file or shape {shape} {tag}")
        out.append((name, wire_tensor(buf[offset:offset + nbytes].view(dt).reshape(shape), tag)))
    return out


class WeightFileLoader:
    """Mixed into vLLM's worker class (`worker_extension_cls`); called through `collective_rpc`."""

    def or1_reload_from_file(self, path: str, file_id: str, entries: list[TensorEntry]) -> int:
        """Load every tensor of `entries` from the file in place (vLLM's layerwise reload, checkpoint
        format: each shard keeps its own slice). The file is mapped and checked before any
        parameter changes, so a file that vanished leaves the old weights whole. Returns the count."""
        items = file_tensors(map_file(path, file_id), entries)
        reload = self.reload_weights  # type: ignore[attr-defined]  # vLLM's Worker method
        reload(weights_iterator=iter(items), is_checkpoint_format=True)
        return len(items)

    def or1_dist_ident(self) -> str:
        """This worker's VLLM_DIST_IDENT: it names the /dev/shm segments of vLLM's CPU all-reduce
        (`<ident>-…-cpushm_<rank>`), which vLLM 0.32 may leave behind at shutdown."""
        return os.environ.get("VLLM_DIST_IDENT", "")
