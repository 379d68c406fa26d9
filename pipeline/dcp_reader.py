"""A DCP storage reader that loads large tensors straight into the model's memory, a bounded chunk at a time.

``torch.distributed.checkpoint``'s ``FileSystemReader`` deserializes each saved tensor whole (``torch.load``) and
then copies it into the destination, so resuming holds a second copy of the largest table shard for a moment: at the
Terabyte shape (2.6 GB FP32 tables) that raised a rank's peak from 7.6 to 12 GB and two ranks together past 21 GB
on a 23 GB machine. Each tensor item of a DCP file is a ``torch.save`` archive whose storage is one uncompressed zip
record, so a plain contiguous tensor can be read from that record in slices and copied into the (possibly narrowed)
destination rows as they arrive. This reader first reads the saved tensor's layout (``torch.load`` onto the meta
device, which reads no data) and does that only where the copy is exact: a 1-D or 2-D row-major tensor starting at
its storage's first byte, of the destination's dtype, whose record is exactly its bytes in this machine's byte order.
Everything else goes to DCP's own path: strided saves (a transpose), a dtype the load converts, 0-D or 3-D and up,
transforms, bytes items, non-CPU destinations. No library offers a bounded-memory DCP load.
"""

from __future__ import annotations

import io
import os
import sys
import zipfile

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

CHUNK_BYTES = 64 << 20
_NATIVE_BYTEORDER = sys.byteorder.encode()  # torch.save records the writer's byte order


class BoundedFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose tensor reads allocate at most ``chunk_bytes`` beyond the destination."""

    def __init__(self, path, chunk_bytes: int = CHUNK_BYTES) -> None:
        super().__init__(path)
        self.chunk_bytes = chunk_bytes
        self.streamed_items = 0  # how many items went the bounded way (tests check it is used)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        rest = []
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            if item.type == LoadItemType.TENSOR and not self.storage_data[item.storage_index].transform_descriptors:
                per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
            else:
                rest.append(item)
        for relative_path, items in per_file.items():
            with self.fs.create_stream(self.fs.concat_path(self.path, relative_path), "rb") as stream:
                for item in items:
                    if not self._stream_tensor(stream, item, planner):
                        rest.append(item)
        if rest:
            return super().read_data(LoadPlan(rest, plan.storage_data), planner)
        done: Future = Future()
        done.set_result(None)
        return done

    def _stream_tensor(self, stream, item: ReadItem, planner: LoadPlanner) -> bool:
        """Copy the item into its destination slice by slice; False (nothing done) where that would not be exact: the
        saved tensor must be 1-D or 2-D, row-major from its storage's first byte, of the destination's dtype, and
        stored as one uncompressed record of exactly its bytes in this machine's byte order."""
        target = planner.resolve_tensor(item).detach()
        if target.device.type != "cpu":
            return False
        info = self.storage_data[item.storage_index]
        window = _Window(stream, info.offset, info.length)
        # On the meta device torch.load reads only the pickled layout (shape, strides, offset, dtype), not the bytes.
        saved = torch.load(window, map_location="meta", weights_only=True)
        if saved.dtype != target.dtype or saved.dim() not in (1, 2) or not saved.is_contiguous() or \
                saved.storage_offset() != 0:
            return False
        rows, cols = (saved.shape[0], 1) if saved.dim() == 1 else saved.shape
        row_bytes = cols * saved.element_size()
        with zipfile.ZipFile(window) as archive:
            records = [i for i in archive.infolist() if "/data/" in i.filename]
            byteorder = [archive.read(i) for i in archive.infolist() if i.filename.endswith("/byteorder")]
            if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED or \
                    records[0].file_size != rows * row_bytes or byteorder != [_NATIVE_BYTEORDER]:
                return False
            record = records[0]
        r0 = item.storage_offsets[0]
        c0 = item.storage_offsets[1] if saved.dim() == 2 else 0
        n = item.lengths[0]
        m = item.lengths[1] if saved.dim() == 2 else 1
        if tuple(target.shape) != ((n, m) if saved.dim() == 2 else (n,)):
            return False
        # The record's bytes start after its local file header (30 bytes, then its name and extra field).
        stream.seek(info.offset + record.header_offset)
        header = stream.read(30)
        start = info.offset + record.header_offset + 30 + int.from_bytes(header[26:28], "little") + \
            int.from_bytes(header[28:30], "little")
        dest = target if saved.dim() == 2 else target.view(n, 1)
        if m == cols and dest.is_contiguous():  # whole rows: read straight into the destination's bytes
            stream.seek(start + r0 * row_bytes)
            if stream.readinto(memoryview(dest.view(torch.uint8).numpy()).cast("B")) != n * row_bytes:
                raise OSError(f"{item.storage_index.fqn}: the checkpoint record ends early (truncated file?)")
        else:  # some columns: whole rows through a bounded buffer
            per_read = max(1, self.chunk_bytes // row_bytes)
            stream.seek(start + r0 * row_bytes)
            for done in range(0, n, per_read):
                k = min(per_read, n - done)
                raw = bytearray(k * row_bytes)
                if stream.readinto(raw) != len(raw):
                    raise OSError(f"{item.storage_index.fqn}: the checkpoint record ends early (truncated file?)")
                dest[done: done + k].copy_(torch.frombuffer(raw, dtype=saved.dtype).view(k, cols)[:, c0: c0 + m])
        planner.commit_tensor(item, target)
        self.streamed_items += 1
        return True


class _Window(io.RawIOBase):
    """The bytes ``[offset, offset + length)`` of a seekable file, as a file of their own (what ``zipfile`` needs:
    read, seek from any end, tell)."""

    def __init__(self, f, offset: int, length: int) -> None:
        super().__init__()
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.length}[whence]
        self.pos = min(max(0, base + pos), self.length)
        return self.pos

    def read(self, size: int = -1) -> bytes:
        size = self.length - self.pos if size is None or size < 0 else min(size, self.length - self.pos)
        self.f.seek(self.offset + self.pos)
        data = self.f.read(size)
        self.pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)
