"""Giving memory pages back to the OS without changing what an array reads: once a tier has copied what it needs
out of the model file, the file's pages need not stay in this process (they are re-read on the next access,
from the page cache or the disk), and rows of an array that a tier never reads can drop their pages."""
from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)


def file_maps(arrays) -> list[mmap.mmap]:
    """The distinct mmap objects under the given arrays (numpy's base chains end at them for GGUF weights)."""
    seen: dict[int, mmap.mmap] = {}
    for a in arrays:
        b = a
        while b is not None and not isinstance(b, mmap.mmap):
            b = getattr(b, "base", None) if not isinstance(b, memoryview) else b.obj
        if isinstance(b, mmap.mmap):
            seen[id(b)] = b
    return list(seen.values())


def release_file_pages(loaded) -> int:
    """Drop every page of the model file mapped in this process (MADV_DONTNEED; the mapping stays valid);
    returns how many maps were released."""
    maps = file_maps(t.data for _, t in loaded.weights.named_tensors())
    for m in maps:
        m.madvise(mmap.MADV_DONTNEED)
    return len(maps)


def release_rows(data: np.ndarray, rows: np.ndarray) -> int:
    """Drop the pages that lie entirely inside the given rows of a C-contiguous 2-D array in anonymous memory
    (they read as zeros afterwards: only for rows nobody reads). Returns the bytes released."""
    if not len(rows):
        return 0
    row_bytes = data.strides[0]
    base = data.__array_interface__["data"][0]
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    # runs of consecutive rows -> byte ranges -> whole pages inside them
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    released = 0
    for run in np.split(rows, breaks):
        start = base + int(run[0]) * row_bytes
        end = base + (int(run[-1]) + 1) * row_bytes
        lo, hi = -(-start // PAGE) * PAGE, end // PAGE * PAGE
        if hi > lo and _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED) == 0:
            released += hi - lo
    return released


def drop_file_cache(path) -> None:
    """Ask the kernel to drop a file's clean pages from the page cache (posix_fadvise DONTNEED), so the next reads
    come from the disk: how a cold run starts (reference/hybrid.md 5.3; pages still mapped by a live mmap stay, so
    release_file_pages first). Advisory: a filesystem that ignores it leaves the pages."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def release_mapped(data) -> None:
    """Drop the pages under an array that lives in a file mapping (the next access re-reads them from the page cache
    or the disk), so a pass over a model larger than the RAM budget keeps one tensor resident at a time, not the
    whole file. Arrays in anonymous memory are left alone (dropping their pages would zero them)."""
    if not file_maps([data]):
        return
    a = np.asarray(data)
    start = a.__array_interface__["data"][0]
    lo, hi = start // PAGE * PAGE, -(-(start + a.nbytes) // PAGE) * PAGE
    if hi > lo:
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)


def available_memory() -> int:
    """Bytes of memory the kernel says are available now (MemAvailable: free plus reclaimable page cache), or the
    physical memory where /proc/meminfo is absent."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
