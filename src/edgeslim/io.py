"""Atomic file writes and run folders that never lose a file edgeslim did not write.

A reader never sees a half-written artifact: files are written under a temporary name and
``os.replace``-d into place, and a run folder is built beside its destination and swapped in
whole (:class:`RunFolder`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from edgeslim.errors import OutputError


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_unique(path.parent, f".{path.name}.", lambda p: os.open(p, _NEW_FILE, 0o666))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def _create_unique(folder: Path, prefix: str, create) -> tuple[Any, Path]:
    """``create(path)`` at a fresh ``folder/<prefix><random>.tmp`` (exclusive: retried on a clash).

    Unlike ``tempfile.mkstemp``/``mkdtemp``, which make private (0600 / 0700) entries, the caller
    creates with the usual modes (0666 files, 0777 folders), so the umask applies as for any file.
    """
    import secrets

    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(6)}.tmp"
        try:
            return create(path), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(folder))


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


# ------------------------------------------------------------------------------------ run folders
# Every run folder holds RUN_MARKER, the files edgeslim wrote into it with their sha256: those
# files, while unchanged, and nothing else, are what a later run may delete. A staging folder holds STAGING_MARKER from the
# moment it is made; only edgeslim ever writes into one, so a stale one is removed whole.
RUN_MARKER = ".edgeslim-run.json"
STAGING_MARKER = ".edgeslim-staging"
_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths atomically (renameat2)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directories ``a`` and ``b`` (Linux renameat2); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # this file system cannot exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def _manifest(folder: Path) -> list[str] | None:
    """The files edgeslim wrote into ``folder`` and that are still as it wrote them (its RUN_MARKER
    records each file's sha256: a file the user has since edited is the user's); None if ``folder``
    is no run folder."""
    try:
        data = json.loads((folder / RUN_MARKER).read_text())
        digests = data["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(digests, dict):
        return None
    ours = []
    for rel, digest in digests.items():
        path = folder / rel
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            continue
        if path.is_file() and not path.is_symlink() and _sha256(path) == digest:
            ours.append(rel)
    return ours


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _entries(folder: Path) -> list[str]:
    """Every file (or link, or empty folder) under ``folder``, as sorted relative paths."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        rel = Path(root).relative_to(folder)
        out += [str(rel / f) if str(rel) != "." else f for f in files]
        out += [str(rel / d) if str(rel) != "." else d for d in dirs
                if Path(root, d).is_symlink() or not any(Path(root, d).iterdir())]
    return sorted(out)


def _foreign(folder: Path) -> list[str]:
    """What in ``folder`` edgeslim did not write (everything, where it holds no RUN_MARKER)."""
    ours = set(_manifest(folder) or ()) | {RUN_MARKER}
    return [e for e in _entries(folder) if e not in ours]


def _remove_ours(folder: Path) -> list[str]:
    """Delete the files ``folder``'s manifest lists, then its empty sub-folders and itself if
    empty; return what is left (files edgeslim did not write, which are never deleted)."""
    for rel in _manifest(folder) or ():
        path = folder / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
    (folder / RUN_MARKER).unlink(missing_ok=True)
    (folder / STAGING_MARKER).unlink(missing_ok=True)
    for root, _, _ in sorted(os.walk(folder), key=lambda t: -len(t[0])):  # deepest first
        try:
            os.rmdir(root)
        except OSError:
            pass  # not empty: it holds something edgeslim did not write
    return _entries(folder) if folder.exists() else []


class RunFolder:
    """The output folder of one run, owned safely from before any work until the run is in place.

    ``with RunFolder(target, overwrite=False) as folder:`` checks ``target`` and takes a lock
    before any work, builds the run in ``folder.staging`` and, when the block ends without an
    error, puts it in place:

    - ``target`` absent, an empty folder, or an earlier run folder holding only edgeslim's files:
      the new folder is swapped in atomically (``renameat2(RENAME_EXCHANGE)`` on Linux: at every
      instant ``target`` is the old run or the new one), then the old run's files are deleted.
    - a folder holding anything edgeslim did not write (the user's files): refused, unless
      ``overwrite``; then the run's files are moved in one by one beside the user's, replacing
      only the earlier run's files (a clash with a user's file is refused before anything moves).
    - a file, or a symbolic link: always refused.

    A lock file beside ``target`` makes a second run into it fail at once. Staging folders of a
    killed run are removed by the next run into the same place. On an error or an interrupt the
    staging folder is removed and ``target`` is left as it was.
    """

    def __init__(self, target: str | Path, *, overwrite: bool = False) -> None:
        self.target = Path(os.path.abspath(os.path.expanduser(str(target))))
        self.shown = str(target)  # the path as the user typed it, for messages
        self.overwrite = overwrite
        self.staging: Path | None = None
        self._lock_fd: int | None = None
        self._lock_path = self.target.parent / f".{self.target.name}.edgeslim-lock"
        self._made_dirs: list[Path] = []
        self._merge = False

    # ---- checks before any work
    def _refuse(self, why: str) -> OutputError:
        return OutputError(f"output {self.shown}: {why}")

    def _check(self) -> None:
        t = self.target
        if t.is_symlink():
            raise self._refuse("is a symbolic link; give the folder it points to, or a new folder")
        if t.exists() and not t.is_dir():
            raise self._refuse("is a file; edgeslim writes a run folder there and never replaces a file "
                               "it did not write (choose another --out)")
        self._merge = False
        if t.is_dir():
            foreign = _foreign(t)
            if foreign and not self.overwrite and _manifest(t) is None and {"metrics.json", "recipe.yaml"} <= set(foreign):
                raise self._refuse("looks like a run folder of an older edgeslim, which did not record the files "
                                   "it wrote; delete it yourself or choose another --out")
            if foreign and not self.overwrite:
                raise self._refuse(f"folder holds files edgeslim did not write (e.g. {foreign[0]}); choose a "
                                   "new folder, or pass --force (overwrite=True) to add the run beside them, "
                                   "which keeps them")
            self._merge = bool(foreign)

    def _make_parent(self) -> None:
        missing = []
        p = self.target.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            for d in reversed(missing):
                d.mkdir()
                self._made_dirs.append(d)
        except OSError as err:
            self._remove_made_dirs()
            raise self._refuse(f"cannot create folder {d}: {err.strerror or err}") from None

    def _remove_made_dirs(self) -> None:
        for d in reversed(self._made_dirs):
            try:
                d.rmdir()
            except OSError:
                pass
        self._made_dirs = []

    def _lock(self) -> None:
        import fcntl

        while True:
            try:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise self._refuse(f"cannot write in {self.target.parent}: {err.strerror or err}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise self._refuse(f"another edgeslim run (pid {pid}) is writing this folder; wait for it "
                                   "to finish or choose another --out") from None
            # The holder before us may have unlinked the file after we opened it: lock the file
            # that is at the path now, or two runs would each hold a lock.
            try:
                same = os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self._lock_fd = fd
                return
            os.close(fd)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            self._lock_path.unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _staging_root(self) -> Path:
        # Beside the target, so that the finished run can be swapped in by one rename; inside it
        # when the run is added to a folder of the user's (whose parent may not be writable).
        return self.target if self._merge else self.target.parent

    def _staging_glob(self) -> list[Path]:
        found = list(self.target.parent.glob(f".{self.target.name}.edgeslim-*.tmp"))
        if self.target.is_dir() and not self.target.is_symlink():
            found += list(self.target.glob(".edgeslim-staging-*.tmp"))
        return [p for p in found if p.is_dir() and not p.is_symlink()]

    def _clean_stale(self) -> None:
        """Remove what killed runs left (we hold the lock: no live run owns these)."""
        old = self._old_path()
        if old.is_dir() and not self.target.exists() and _manifest(old) is not None:
            os.rename(old, self.target)  # killed between the two renames of the fallback swap
        for stale in self._staging_glob():
            if (stale / STAGING_MARKER).exists():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                left = _remove_ours(stale)
                if left:
                    print(f"edgeslim: warning: left {stale} in place: it holds files edgeslim did not write "
                          f"(e.g. {left[0]})", file=sys.stderr)

    def _old_path(self) -> Path:
        return self.target.parent / f".{self.target.name}.edgeslim-old.tmp"

    def __enter__(self) -> "RunFolder":
        self._check()  # cheap checks first: no folder is created for a refused target
        self._make_parent()
        try:
            self._lock()
            try:
                self._clean_stale()
                self._check()
                root = self._staging_root()
                prefix = ".edgeslim-staging-" if self._merge else f".{self.target.name}.edgeslim-"
                try:
                    _, self.staging = _create_unique(root, prefix, lambda p: p.mkdir(0o777))
                except OSError as err:
                    raise self._refuse(f"cannot write in {root}: {err.strerror or err}") from None
                (self.staging / STAGING_MARKER).write_text(str(os.getpid()))
            except BaseException:
                self._unlock()
                raise
        except BaseException:
            self._remove_made_dirs()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
                self._remove_made_dirs()
                return
            # Interrupts wait until the run is in place: a half-moved run would need a clean-up.
            import signal

            blocked = {signal.SIGINT, signal.SIGTERM}
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if hasattr(signal, "pthread_sigmask") else None
            try:
                self._commit()
            except BaseException:
                if self.staging is not None and self.staging.exists():
                    _remove_ours(self.staging)  # the new run before the swap, or the old one after it
                raise
            finally:
                if old_mask is not None:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        finally:
            self._unlock()

    # ---- putting the finished run in place
    def _commit(self) -> None:
        staging = self.staging
        (staging / STAGING_MARKER).unlink()
        files = _entries(staging)
        write_json(staging / RUN_MARKER, {"edgeslim_run": 1, "sha256": {f: _sha256(staging / f) for f in files}})
        self._check()  # the user may have added files while the run worked
        if self._merge:
            self._merge_in(staging, files)
        elif not self.target.exists():
            os.rename(staging, self.target)
        elif _exchange(staging, self.target):
            _remove_ours(staging)  # staging now holds the previous run
        else:
            old = self._old_path()
            os.rename(self.target, old)
            os.rename(staging, self.target)
            _remove_ours(old)
        self.staging = None

    def _merge_in(self, staging: Path, files: list[str]) -> None:
        """Move the run's files into a folder that also holds the user's files, never replacing one
        of those: a clash is refused before anything moves."""
        t = self.target
        previous = set(_manifest(t) or ())
        clash = [f for f in files + [RUN_MARKER] if (t / f).exists() and f not in previous | {RUN_MARKER}]
        clash += [f for f in files if any((t / p).is_file() and str(p) not in previous
                                          for p in list(Path(f).parents)[:-1])]
        if clash:
            raise self._refuse(f"the run would replace {clash[0]}, which edgeslim did not write; "
                               "choose a new folder")
        gone = sorted(previous - set(files))  # the earlier run's files the new run does not have
        for rel in gone:
            p = t / rel
            if p.is_file() or p.is_symlink():
                p.unlink()
        for d in sorted({q for rel in gone for q in Path(rel).parents if str(q) != "."}, key=lambda q: -len(q.parts)):
            try:
                (t / d).rmdir()  # the earlier run's sub-folders, where nothing else is left in them
            except OSError:
                pass
        (t / RUN_MARKER).unlink(missing_ok=True)
        for rel in files:
            (t / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, t / rel)
        os.replace(staging / RUN_MARKER, t / RUN_MARKER)  # last: the list is complete once it is there
        shutil.rmtree(staging, ignore_errors=True)
