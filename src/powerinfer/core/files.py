"""Writing files without trusting what is already on disk: every file the project writes (artifacts, caches,
training parts, converted models, outputs) goes to a fresh temporary file in the same directory, created with
O_EXCL (mkstemp: a link planted at the temporary name fails the open instead of being followed), and is then
renamed over the destination. rename() replaces a symlink at the destination instead of writing through it, so a
link planted where a cache file will go (`predictors.parts/layer_0.pt -> /etc/passwd`) is replaced, never followed,
and a reader never sees half a file. Directories the project creates are made user-only (0700).

No fsync: atomicity against concurrent readers needs only the rename; the files are caches and outputs that a
rerun remakes after a power cut.
"""
from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import PowerInferError


def _umask() -> int:
    # os.umask() can only be read by setting it, which races with other threads; Linux reports it in /proc.
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def ensure_dir(path: str | Path) -> Path:
    """Create `path` and any missing parents with mode 0700 (existing directories are left as they are)."""
    path = Path(path).expanduser()
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        if p.is_symlink():  # a dangling link where a directory should be
            raise PowerInferError(f"{p}: is a symbolic link to nowhere; refusing to create a directory through it")
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise PowerInferError(f"{d}: cannot create the directory ({e.strerror})") from None
    if not path.is_dir():
        raise PowerInferError(f"{path}: exists and is not a directory")
    return path


def artifact_dir(path: str | Path) -> Path:
    """ensure_dir for a directory the project names and fills itself (predictors.parts, profile samples): refused
    when it is a symbolic link, so files meant for the cache cannot be created wherever a planted link points."""
    path = Path(path).expanduser()
    if path.is_symlink():
        raise PowerInferError(f"{path}: is a symbolic link; refusing to write artifacts through it "
                              "(remove it and run again)")
    return ensure_dir(path)


def _check_target(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise PowerInferError(f"{path}: is a directory, expected a file to write")


@contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield the path of a new empty temporary file beside `path` (for writers that want a file name: GGUFWriter,
    safetensors, numpy memmaps); on success it is renamed to `path`, on error removed. `mode` defaults to what a
    plain open() would give (0666 minus the umask)."""
    path = Path(path).expanduser()
    ensure_dir(path.parent)
    _check_target(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise PowerInferError(f"{path}: cannot write ({e.strerror})") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, (0o666 & ~_umask()) if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path: str | Path, text: bool = False, mode: int | None = None) -> Iterator:
    """Yield a file object (binary, or UTF-8 text with `text`) whose contents replace `path` on success."""
    with atomic_path(path, mode) as tmp:
        # O_NOFOLLOW: the temporary name is ours (mkstemp), so a link there now means someone swapped it
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0))
        with (open(fd, "w", encoding="utf-8", newline="") if text else open(fd, "wb")) as fh:
            yield fh


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_write(path) as fh:
        fh.write(data)
    return Path(path).expanduser()


def write_text(path: str | Path, data: str) -> Path:
    with atomic_write(path, text=True) as fh:
        fh.write(data)
    return Path(path).expanduser()
