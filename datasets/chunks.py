"""Byte ranges of a plain text file that start and end on line boundaries, and the newlines in each: what lets the
converter spread one large input over several processes while every error still names the file's true line.

TorchRec's converters (``BinaryCriteoUtils.tsv_to_npys``) read a file in one process from its start; nothing there
splits one file, so this is ours.
"""

from __future__ import annotations

import math
from pathlib import Path

_BLOCK = 1 << 24


def line_ranges(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    """``[begin, end)`` byte ranges covering the file, each about ``chunk_bytes`` long and each starting at a line
    start; one range when the file is no larger than ``chunk_bytes``. Which ranges a file gets depends only on its
    bytes and ``chunk_bytes``, never on how many processes convert it."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    size = path.stat().st_size
    n = max(1, math.ceil(size / chunk_bytes))
    starts = [0]
    with open(path, "rb") as f:
        for i in range(1, n):
            f.seek(i * size // n - 1)
            f.readline()  # ends just past the next newline: the start of a line (or the nominal start itself)
            start = f.tell()
            if starts[-1] < start < size:  # a line longer than a chunk swallows the next nominal start
                starts.append(start)
    return list(zip(starts, starts[1:] + [size]))


def count_newlines(path: Path, begin: int = 0, end: int | None = None) -> int:
    """Newline bytes in ``[begin, end)`` of the file (the whole file by default), read in large blocks."""
    end = path.stat().st_size if end is None else end
    n = 0
    with open(path, "rb") as f:
        f.seek(begin)
        left = end - begin
        while left > 0:
            block = f.read(min(_BLOCK, left))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def ends_with_newline(path: Path) -> bool:
    """Whether the last byte is a newline (an empty file counts as ending cleanly)."""
    size = path.stat().st_size
    if size == 0:
        return True
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"
