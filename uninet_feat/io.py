"""Atomic file writes: a crash or a kill leaves either the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import socket
import stat
import tempfile
import threading
from pathlib import Path
from typing import Callable

from .errors import BadInputError


def atomic_write(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """Call ``writer(tmp_path)`` on a temp file in the target's folder, fsync, then rename over ``path``."""
    tmp = staged(path, writer)
    with _removed_on_failure(tmp, path):
        os.replace(tmp, path)
    return Path(path)


@contextlib.contextmanager
def _removed_on_failure(tmp: str, path):
    """Remove ``tmp`` when the block fails; a full disk is said as such (the target is untouched)."""
    try:
        yield
    except BaseException as e:
        _cleanup(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BadInputError("disk full while writing; the previous version of this file is intact",
                                path=path, fix="free disk space and run the command again") from e
        raise


_FIRST_WRITE: dict = {}   # folder → what to write there before its first output (`records_first`)
_FIRST_LOCK = threading.Lock()


@contextlib.contextmanager
def records_first(folder, write_records: Callable[[], None]):
    """While the block runs, the first file written under ``folder`` (every write goes through `staged`) is preceded
    by ``write_records()``: a command's config.yaml and env.json then describe its outputs from the first one
    replaced on, and a command killed after that never leaves an earlier command's records beside its results.
    Yields ``flush()``, which writes the records now if nothing was written there yet (a command with no output)."""
    key = os.path.abspath(folder)
    _FIRST_WRITE[key] = write_records

    def flush() -> None:
        with _FIRST_LOCK:
            due = _FIRST_WRITE.get(key) is write_records and _FIRST_WRITE.pop(key)
        if due:
            write_records()
    try:
        yield flush
    finally:
        _FIRST_WRITE.pop(key, None)


SCRATCH = ".partial"   # a command's resumable parts under its --out: scratch, not outputs the records describe


def _before_write(path) -> None:
    if not _FIRST_WRITE:
        return
    p = os.path.abspath(path)
    with _FIRST_LOCK:
        due = [k for k in _FIRST_WRITE if p == k or (p.startswith(k.rstrip(os.sep) + os.sep)
                                                      and Path(os.path.relpath(p, k)).parts[0] != SCRATCH)]
        calls = [_FIRST_WRITE.pop(k) for k in due]
    for call in calls:   # its own files come back here with the folder gone from the table
        call()


def staged(path: str | os.PathLike, writer: Callable[[str], None]) -> str:
    """``writer(tmp_path)`` on a temp file in ``path``'s folder, fsynced and with ``path``'s mode: the caller puts it
    in place (``os.replace``) or removes it. Why apart from `atomic_write`: a pair of files (export-model's
    model.onnx and model.json) is written in full first and then renamed back to back. The command's records
    (`records_first`) are written once ``writer`` has succeeded, before the caller puts the file in place: a writer
    that refuses (export-model's check) leaves the folder's earlier records with its earlier outputs."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a short prefix: a name near the file system's 255-byte limit must not fail for its temp file alone; the
        # writer's host and PID, so that a kill's leftover can be told from a live writer's (`remove_dead_temps`)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:32]}.{_writer()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise BadInputError(f"cannot write here ({e.strerror or e})", path=path,
                            fix="choose an output in a writable folder (an existing file cannot be a folder)") from e
    os.close(fd)
    with _removed_on_failure(tmp, path):
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, open_mode(path))   # mkstemp made it 0600
        _before_write(path)
    return tmp


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def _writer() -> str:
    return f"{_HOST}-pid{os.getpid()}"   # a function: a forked worker writes under its own PID


_DEAD_TEMP = re.compile(r"\.(?P<host>[A-Za-z0-9-]+)-pid(?P<pid>\d+)\.[^.]+\.tmp$")


def remove_dead_temps(folder, pattern: str = ".*.tmp", unnamed: bool = False) -> list[Path]:
    """Remove ``folder``'s temp files of `atomic_write` (those matching ``pattern``) whose writer, a process of this
    host named in the file's name, is gone: a SIGKILL mid-write leaves its temp file, which nothing else removes.
    A live writer's, another host's (a store on a shared disk filled by several machines) and an older version's
    (no PID in the name) are kept; the last removed too with ``unnamed``. Returns the files removed."""
    gone = []
    if os.name == "nt":   # os.kill(pid, 0) there terminates the process, it does not probe it
        return gone
    for tmp in Path(folder).glob(pattern):
        m = _DEAD_TEMP.search(tmp.name)
        if m is None and unnamed:
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
        if m is None or m["host"] != _HOST:
            continue
        try:
            os.kill(int(m["pid"]), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
        except (PermissionError, OverflowError, ValueError):   # alive, another user's; or not a PID
            pass
    return gone


_umask_lock = threading.Lock()


def open_mode(path) -> int:
    """The permission bits a plain ``open(path, "w")`` would leave: an existing file's own, else 0666 & ~umask.

    Temp files from ``mkstemp`` are 0600; renamed into place as they are, a run's outputs would be unreadable
    to the group and others that the umask lets read them."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        pass
    with _umask_lock:   # the umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def _cleanup(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass


def _text_writer(text: str):
    def w(tmp):
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            f.write(text)
    return w


def atomic_write_text(path, text: str) -> Path:
    """``text`` as UTF-8, its line ends as given. Why: the locale's encoding (cp1252 on Windows) failed on the report's
    "·" after all the scoring, and on image names outside it; newline translation turned the CSV writer's \\r\\n
    into \\r\\r\\n. Our JSON, YAML and HTML end lines in \\n on every system. A file name that is not UTF-8 (Linux
    allows any bytes; Python reads b"caf\\xe9.png" as "caf\\udce9.png") is written as its own bytes
    (surrogateescape), so a CSV names the file that is there: it was a UnicodeEncodeError after all the scoring."""
    return atomic_write(path, _text_writer(text))


def staged_text(path, text: str) -> str:
    """`staged` for ``text``, written as `atomic_write_text` writes it."""
    return staged(path, _text_writer(text))


def atomic_write_bytes(path, data: bytes) -> Path:
    def w(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return atomic_write(path, w)


def atomic_write_csv(path, rows: list[dict]) -> Path:
    """Rows of dicts (the first row's keys are the header) as a CSV file, atomically."""
    import csv
    import io as _io
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["path"])
    w.writeheader()
    w.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def read_json(path, fix: str):
    """The JSON in ``path``; a damaged file (a kill before atomic writes, an edit) is a `BadInputError` naming it
    and ``fix``, not a traceback."""
    import json
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot read this JSON file ({type(e).__name__}: {e})", path=path, fix=fix) from e


def user_yaml(text: str, name: str = "<text>"):
    """YAML a user wrote (a --config file, a prompt file), parsed as `yaml.safe_load` does, but a key given twice in one
    mapping is a `yaml.YAMLError` naming it and its line: PyYAML keeps the last silently, so a second `normal:` list
    replaced the first, or a second `epochs:` the one a user was reading (an audit, session 52)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        keys = [loader.construct_object(k, deep=True) for k, _ in node.value]
        for i, (k, _) in enumerate(node.value):
            if keys[i] in keys[:i]:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {keys[i]!r} is given twice in one mapping (the last would replace the first "
                    "without a word)", k.start_mark)
        return loader.construct_mapping(node, deep=True)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    stream = io.StringIO(text)
    stream.name = str(name)   # the marks name the file, not "<unicode string>"
    return yaml.load(stream, Loader=Loader)   # noqa: S506 - a SafeLoader subclass


def read_yaml(path, fix: str):
    """The YAML in ``path`` (None when empty); a damaged file is a `BadInputError` naming it and ``fix``."""
    import yaml
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise BadInputError(f"cannot read this YAML file ({type(e).__name__}: {e})", path=path, fix=fix) from e


def _alone(fd: int) -> bool:
    """Whether the shared lock on ``fd`` could be made exclusive: no other process holds the folder."""
    import fcntl
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def folder_lock(folder, what: str = "run", shared: bool = False, fix: str = "wait for it to finish, or choose "
                "another --out"):
    """Hold an exclusive lock on ``folder`` (created if needed) while the body writes into it; a second
    process asking for it is refused at once. Why: two `train --out SAME` started together both passed the
    "folder already holds a run" check and interleaved their files (one run's config beside the other's model);
    two `train-head --out SAME` (a retried pipeline step) left one head beside the other's CV report.
    ``shared``: a lock that other shared holders may hold too (the jobs of one sharded `extract`) and an exclusive
    one may not. The kernel drops the lock when its process dies (flock), so a killed run never leaves the folder
    locked. On a filesystem without locks the body runs unlocked, with a warning.
    Then, exclusive only, temp files of atomic writes that a kill left (``.NAME.XXXX.tmp``) are removed, in the
    folder and its subfolders: those of writers that are gone (`remove_dead_temps`; and an older version's,
    unnamed). A live writer's is kept: a `predict --out RUN/preds` or a `calibrate` may be writing
    (all of them were removed, and the live writer's rename then failed)."""
    import fcntl
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    held = False
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            raise BadInputError(f"another process is writing this {what} folder now", path=folder, fix=fix) from None
        except OSError as e:   # e.g. a network filesystem mounted without lock support (ENOLCK)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
                raise
            import warnings
            warnings.warn(f"{folder}'s filesystem cannot lock files ({e.strerror}): another process writing into it "
                          "now would not be noticed; run one writer at a time there")
            held = True   # as the folder's one writer, which is all the caller can be told
        if not shared:   # (held: a refusal raised above)
            for sub in [folder, *(d for d in folder.iterdir() if d.is_dir())]:
                remove_dead_temps(sub, unnamed=True)
        yield folder
    except BaseException:
        # stopped before writing anything: no empty folder left behind; only by the holder, since a refused
        # process's folder (it made it just before the holder took the lock) is the holder's, .lock included
        # (a shared holder only when it holds the folder alone: its lock turns exclusive)
        if held and created and [p.name for p in folder.iterdir()] == [".lock"] and (not shared or _alone(fd)):
            (folder / ".lock").unlink(missing_ok=True)
            folder.rmdir()
        raise
    finally:
        os.close(fd)   # releases the lock
