"""Atomic file writing: a reader (or a resumed run) never sees a half-written file. And an
exclusive lock on a directory, so two processes never train into the same exp dir."""

import contextlib
import functools
import gzip
import hashlib
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import IO, Iterator, Optional, Union

PathLike = Union[str, Path]


TEMP_MARK = ".tmp"  # atomic_path's temporary names: .<name>.<random>.tmp<the name's suffixes>


def _temp_prefix(name: str) -> str:
    return f".{name}."


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same directory; rename it onto `path` on success.

    The temporary name keeps the final suffix (e.g. ``.jsonl.gz``) so that libraries that
    pick a format from the extension (lhotse, torch) still do the right thing. The data reaches
    the disk before the rename, and the rename before we return: otherwise a node crash can
    leave `path` renamed but truncated (a checkpoint that blocks every restart). A process killed
    inside leaves its temporary file behind: see remove_temp_files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=f"{TEMP_MARK}{suffix}")
    tmp = Path(tmp)
    try:
        try:  # mkstemp makes 0600: the usual permissions, where the filesystem has any (FAT refuses chmod)
            os.fchmod(fd, 0o666 & ~_umask())
        except OSError:
            pass
        finally:
            os.close(fd)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_torch_atomic(obj, path: PathLike) -> None:
    """torch.save(OBJ) to PATH, atomically. Through an open file: given a path, torch names the
    archive's inner folder after the file, here atomic_path's random temporary name, so the same
    weights saved twice had other bytes (and digests, which the recipes compare)."""
    import torch  # (this module serves tools without torch too)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def flush_to_disk() -> None:
    """Everything written so far reaches the disk (os.sync). For files a library wrote without an
    fsync (lhotse's feature and array writers), before the record that vouches for them: a node
    crash must not leave a done mark over truncated features or labels."""
    os.sync()


def _fsync(path: Path) -> None:
    """Flush PATH (a file, or a directory: its entries) to the disk. Some filesystems refuse a
    directory's fsync (EINVAL, EBADF); nothing more can be done there."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def remove_temp_files(directory: PathLike, name_pattern: str) -> int:
    """Removes the temporary files atomic_path left in DIRECTORY for names matching NAME_PATTERN
    (a glob, e.g. ``model_valid_*.pt``) when killed; returns how many. Only for a directory no
    other process writes those names into (its owner holds the directory's lock)."""
    removed = 0
    for tmp in Path(directory).glob(f"{_temp_prefix(name_pattern)}*{TEMP_MARK}*"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: Optional[PathLike]) -> Optional[str]:
    """The SHA-256 of a file's bytes (None for no path or a missing file): what a model or lexicon
    file was when something was made from it. Read once per version of the file (_identity)."""
    if path is None or not Path(path).is_file():
        return None
    return _sha256(str(Path(path).resolve()), *_identity(Path(path).stat()))


def _identity(stat: os.stat_result) -> tuple:
    """What tells a file's versions apart for the caches: size, mtime, and inode and ctime (an
    atomic rewrite is a new inode; a coarse or restored mtime alone can repeat)."""
    return stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns


@functools.lru_cache(maxsize=64)
def _sha256(path: str, *identity) -> str:  # identity: the cache key
    with open(path, "rb") as f:
        return _stream_sha256(f)


def content_sha256(path: PathLike) -> str:
    """The SHA-256 of a file's content, a .gz file's decompressed: gzip's header holds a name and a
    time, so the same content written again would differ as a file. Read once per version of the
    file (_identity), as file_sha256."""
    return _content_sha256(str(Path(path).resolve()), *_identity(Path(path).stat()))


@functools.lru_cache(maxsize=64)
def _content_sha256(path: str, *identity) -> str:  # identity: the cache key
    with open(path, "rb") as raw:  # gzip by its magic bytes: a .gz name may link to a blob of another name
        compressed = raw.read(2) == b"\x1f\x8b"
    with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
        return _stream_sha256(f)


def _stream_sha256(f: IO[bytes]) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def append_line(path: PathLike, line: str) -> None:
    """Append one line with a single write+fsync, so concurrent appenders never interleave. A
    last line left unfinished (a write cut short, say by a full disk) is ended first, so the new
    line stays whole rather than glued onto the fragment (which readers then report, named)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        written = 0
        while written < len(data):  # os.write may write part of it
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectoryInUse(RuntimeError):
    pass


def lock_directory(directory: PathLike, wait_for_exited: float = 30.0) -> IO:
    """Hold an exclusive lock on DIRECTORY/.lock until the returned file is closed or the process
    ends (the kernel releases it then, after a kill -9 too). Another holder is DirectoryInUse,
    naming its pid. Why: a rerun while an earlier trainer still runs (its driver killed, not it)
    would have two processes writing, and pruning, the same checkpoints. A holder that has exited
    may have left forked children (data-loader workers share the lock) that end within seconds:
    up to `wait_for_exited` seconds are given to them."""
    import fcntl  # POSIX only, as the recipes
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / ".lock", "a+", encoding="utf-8")
    deadline = time.monotonic() + wait_for_exited
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            handle.seek(0)
            pid, _, host = (handle.read().strip() or "unknown").partition(" ")
            here = host in ("", socket.gethostname())  # a pid of another host cannot be looked up here
            running = not here or _running(pid)
            if running or time.monotonic() > deadline:
                handle.close()
                raise DirectoryInUse(f"{directory} is in use by another process (pid {pid}"
                                     f"{'' if here else f' on host {host}'}"
                                     f"{'' if running else ', exited; its children hold it'}): "
                                     "stop it, or wait for it to finish") from None
            time.sleep(0.2)
    handle.truncate(0)
    handle.write(f"{os.getpid()} {socket.gethostname()}\n")  # the exp dir may be shared by several hosts
    handle.flush()
    return handle


def _running(pid: str) -> bool:
    """Whether process PID exists (an unreadable pid counts as running: the lock is real)."""
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
