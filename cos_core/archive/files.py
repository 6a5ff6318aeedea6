"""How archive files are touched on disk: only regular files are opened (never a FIFO, socket, device or folder named
as a file, never a path that resolves outside the run), reads are bounded by a size limit, and every write goes
through a temporary sibling named for its owner (host, pid, random part) that is fsynced, given the mode every other
file gets (0666 minus the umask: 0644 usually) and renamed. Stale temporaries are removed only when their owner is
dead; `locked` is the advisory lock that serialises read-modify-write. Imports the standard library and `schema` only.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from .schema import ArchiveError, inside


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


FILE_MODE = 0o666 & ~_umask()  # what open() gives every other file: shards, tables and manifests alike
HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()
_TEMP_RE = re.compile(r"\.(?:tmp|old)-(?:(?P<host>[0-9a-f]{8})-)?(?P<pid>\d+)(?:-[0-9a-f]+)?$")
_PROC_FD = Path("/proc/self/fd").is_dir()
_PROC = Path("/proc/self/stat").is_file()


# ---- temporaries and their owners ---------------------------------------------------------------------------------
def temp_path(path: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of `path` unique to this write: ``.<name>.tmp-<host>-<pid>-<random>`` (kind "old": a set
    being retired). Threads of one process (Streamlit sessions) get different names, and `owner_alive` can tell
    whether the writer still runs."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def _start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None when it is gone or a zombie (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            return None
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except FileNotFoundError:
        return None


def owner_alive(path: Path) -> bool:
    """Whether the process that named temporary `path` may still be writing it. True when in doubt: another host's
    temporary, this process's own, an owner that exists (and, where /proc tells, started before the file was last
    written: a later process with a reused pid is not the owner)."""
    match = _TEMP_RE.search(Path(path).name)
    if match is None:
        return True
    pid = int(match["pid"])
    if (match["host"] or HOST) != HOST or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    if not _PROC:
        return True
    try:
        started = _start_time(pid)
        written = os.lstat(path).st_mtime
    except (OSError, ValueError, StopIteration, IndexError):
        return True
    return started is not None and started <= written + 1.0  # 1 s: the clock-tick rounding of `started`


def is_temp(name: str) -> bool:
    return name.startswith(".") and _TEMP_RE.search(name) is not None


def remove_stale(folder: Path, prefix: str = ".") -> list[Path]:
    """Delete the temporaries (files or folders) in `folder` whose names start with `prefix` and whose owner is dead;
    never one a live process may still be writing. Returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:  # no such folder (yet), or one we may not list: nothing we could remove
        return removed
    for entry in entries:
        if not (entry.name.startswith(prefix) and is_temp(entry.name)) or owner_alive(entry):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


# ---- writing --------------------------------------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` into a temporary sibling of its own, then fsync, set `FILE_MODE` and rename over `path`: a reader
    sees the old file or the new one, two writers never share a temporary, and a failed write leaves nothing."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as err:  # a failed write() names no file: say which one (the CLI prints it)
        if err.filename is None:
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def io_error(err: Exception, path: Path) -> Exception:
    """A library's I/O failure (safetensors says "I/O error: ... (os error 28)" in its message) as the OSError it is,
    naming `path`; any other failure as an ArchiveError naming `path`."""
    code = re.search(r"(?:os error|code:) (\d+)", str(err))
    if code:
        return OSError(int(code[1]), os.strerror(int(code[1])), str(path))
    return ArchiveError(f"cannot write {path}: {err}")


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the kernel, C library or
    file system cannot, so the caller falls back to two renames."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on the file `path`, created if needed: it excludes other processes and other
    threads of this one (each call opens its own file description), and dies with its holder."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---- reading --------------------------------------------------------------------------------------------------------
def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def regular(run_dir: Path, path: Path, what: str) -> os.stat_result:
    """The stat of `path` after checking that it exists, resolves inside `run_dir` and is a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        kind = "a dangling symlink" if os.path.islink(path) else None
        raise ArchiveError(f"{run_dir}: {what} is missing" + (f" ({kind})" if kind else "")) from None
    except OSError as err:
        raise ArchiveError(f"{path} cannot be read: {err.strerror or err}") from None
    inside(run_dir, path, what)
    if not stat.S_ISREG(st.st_mode):
        raise ArchiveError(f"{path} is {_kind(st.st_mode)}, not a regular file; refusing to open it")
    return st


@contextmanager
def open_regular(run_dir: Path, path: Path, what: str, limit: int | None = None) -> Iterator[BinaryIO]:
    """`path` opened for reading, checked on the open descriptor itself (no swap between check and open): a regular
    file inside `run_dir` of at most `limit` bytes. Opening never blocks (O_NONBLOCK: a FIFO is refused, not
    waited on)."""
    regular(run_dir, path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise ArchiveError(f"{path} cannot be read: {err.strerror or err}") from None
    f = os.fdopen(fd, "rb")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArchiveError(f"{path} is {_kind(st.st_mode)}, not a regular file; refusing to open it")
        if limit is not None and st.st_size > limit:
            raise ArchiveError(f"{path} is {st.st_size} bytes, over the {limit}-byte limit for {what}")
        yield f
    finally:
        f.close()


def fd_path(f: BinaryIO, path: Path) -> str:
    """A name for the already-checked open file `f` that a library taking file names (safetensors) can open: the
    descriptor itself on Linux (/proc/self/fd/N, so the file checked is the file read), else `path`."""
    return f"/proc/self/fd/{f.fileno()}" if _PROC_FD else str(path)


def read_bytes(run_dir: Path, path: Path, what: str, limit: int) -> bytes:
    try:
        with open_regular(run_dir, path, what, limit) as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise ArchiveError(f"{path} cannot be read: {err.strerror or err}") from None
    if len(data) > limit:  # it grew after the check
        raise ArchiveError(f"{path} is over the {limit}-byte limit for {what}")
    return data


def read_json(run_dir: Path, path: Path, what: str, limit: int) -> Any:
    """The JSON value in `path` (a regular file inside `run_dir`, at most `limit` bytes); ArchiveError otherwise."""
    data = read_bytes(run_dir, path, what, limit)
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ArchiveError(f"{path} is not valid JSON: nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, integers of more than 4300 digits
        raise ArchiveError(f"{path} is not valid JSON: {err}") from None

