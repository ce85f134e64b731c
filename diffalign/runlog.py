"""The run directory's metrics log (`metrics.jsonl`) and its lock (one run per output directory).

`metrics.jsonl` holds one JSON object per epoch. Lines are appended as epochs end; a resumed run rewrites the file
(dropping epochs after its checkpoint) through a temporary file and a rename, so a kill at any moment leaves either
the old or the new file, never a truncated one. Non-finite values are written as `null` (valid JSON), and a reader
skips a line cut by a kill mid-append.

The lock is `<output_dir>/.diffalign.lock`, holding the pid, host and command of the run. It is an advisory `flock`
held for the lifetime of the run, so the kernel releases it when the process dies (even by SIGKILL): a later run
finds the file, sees it is not locked, and takes it over. A run that ends (success, error or Ctrl-C) empties the file
before unlocking it, so only a killed run is reported as one that "ended without releasing" its lock.

A run directory holding only `metrics.jsonl` (a run stopped before its first checkpoint) has nothing to resume: a new
run there starts over instead of being refused. Where `flock` is unavailable, a lock whose pid no longer
exists on this host is stale and taken over.
"""

import json
import logging
import math
import os
import socket
import sys
import threading
import time
import weakref
from typing import Dict, Iterable, List

from .errors import RunDirectoryError, is_disk_error, output_error
from .utils.process_utils import pid_alive

logger = logging.getLogger("diffalign")

METRICS = "metrics.jsonl"
LOCK = ".diffalign.lock"


# ------------------------------------------------------------------ metrics
def _finite(value):
    """`value` with every non-finite float replaced by `None` (so that `json.dumps` writes valid JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return _finite(value.item())
    return value


def finite_json(value):
    """`value` ready for strict JSON: every non-finite float (also in nested dicts and lists) becomes `None`."""
    return _finite(value)


def dumps_record(record: Dict) -> str:
    """One line of strict JSON: NaN and infinities become `null`."""
    return json.dumps(_finite(record), allow_nan=False, default=str)


def append_metrics(path: str, record: Dict):
    """Appends `record` as one line to `path` (a line cut by an earlier kill is terminated first)."""
    line = dumps_record(record) + "\n"
    try:
        with open(path, "ab") as f:
            if f.tell() > 0:
                with open(path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        line = "\n" + line
            f.write(line.encode("utf-8"))
            f.flush()
    except OSError as e:
        if is_disk_error(e):
            raise output_error(f"'{path}'", e) from e
        raise


def read_metrics(path: str) -> List[Dict]:
    """The records of `path` (none if it does not exist). A line that is not a JSON object (the last line cut by a
    kill mid-append, or a damaged one) is skipped with a warning instead of making the run unreadable."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict):
            cut = number == len(lines) or (number == len(lines) - 1 and not lines[-1])
            logger.warning("%s: line %d is %s; skipped", path, number,
                           "cut short (the run was killed while writing it)" if cut else "not a JSON object")
            continue
        records.append(record)
    return records


def write_metrics(path: str, records: Iterable[Dict]):
    """Replaces `path` by `records`, atomically: a temporary file in the same directory, fsync, then rename."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".tmp-{os.path.basename(path)}-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(dumps_record(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and is_disk_error(e):
            raise output_error(f"'{path}'", e) from e
        raise


# --------------------------------------------------------------------- lock
def _describe(info: dict, path: str) -> str:
    if not info:
        return f"another process (lock file {path})"
    started = info.get("time")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else ""
    command = f" running '{info['command']}'" if info.get("command") else ""
    return f"pid {info.get('pid')} on host {info.get('host')}{when}{command}"


def _read_lock(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.loads(f.read() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


_HELD: Dict[str, "RunLock"] = {}  # realpath -> lock held by this process (shared by trainers of one process)
_HELD_GUARD = threading.Lock()


class RunLock:
    """An exclusive lock on a run directory, held by this process until `release()` (or until it exits).

    Trainers of the same process share it (`acquire_run_lock` counts references); another process gets a
    `RunDirectoryError` naming the holder (pid, host, start time, command).
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK)
        self._file = None
        self.refs = 0

    def _info(self) -> dict:
        from .utils.redaction import redact_argv

        # the command line may carry a token (--reward_kwargs '{headers: ...}') and the home path: both hidden
        argv = redact_argv(sys.argv)
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(argv))
        return {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "command": command[:200]}

    def acquire(self):
        try:
            import fcntl
        except ImportError:  # no flock (Windows): pid files
            return self._acquire_pidfile()
        try:
            f = open(self.path, "a+", encoding="utf-8")
        except OSError as e:
            if is_disk_error(e):
                raise output_error(f"the lock file '{self.path}'", e) from e
            raise
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            info = _read_lock(self.path)
            raise RunDirectoryError(
                f"output_dir '{self.directory}' is in use by another run ({_describe(info, self.path)}): wait for it "
                f"to finish, stop it, or choose another --output_dir"
            ) from None
        previous = _read_lock(self.path)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            logger.info("taking over the lock of a run that ended without releasing it (%s)",
                        _describe(previous, self.path))
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps(self._info()) + "\n")
            f.flush()
        except OSError as e:
            f.close()
            if is_disk_error(e):
                raise output_error(f"the lock file '{self.path}'", e) from e
            raise
        self._file = f
        return self

    def _acquire_pidfile(self):
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                info = _read_lock(self.path)
                pid = info.get("pid")
                stale = (not info) or (info.get("host") == socket.gethostname() and isinstance(pid, int)
                                        and not pid_alive(pid))
                if not stale:
                    raise RunDirectoryError(
                        f"output_dir '{self.directory}' is in use by another run ({_describe(info, self.path)}): wait "
                        f"for it to finish, stop it, or choose another --output_dir (or delete {self.path} if that "
                        f"process is gone)"
                    ) from None
                logger.info("removing the stale lock of a run that no longer exists (%s)", _describe(info, self.path))
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(self._info()) + "\n")
            self._file = True
            return self
        raise RunDirectoryError(f"output_dir '{self.directory}': cannot take the lock {self.path}")

    def release(self):
        if self._file is None:
            return
        if self._file is True:
            try:
                os.remove(self.path)
            except OSError:
                pass
        else:
            try:
                # emptied while still locked: the next run finds no holder, so it does not take this one for a run
                # that died (only a killed process leaves its pid in the file)
                self._file.seek(0)
                self._file.truncate()
                self._file.flush()
            except OSError:
                pass
            try:
                self._file.close()  # releases the flock; the file stays (a later run overwrites it)
            except OSError:
                pass
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None


def acquire_run_lock(directory: str, owner=None) -> RunLock:
    """Locks `directory` for this process (re-entrant within the process). With `owner`, the reference is dropped
    when `owner` is garbage-collected; the lock is released when no reference is left (or at process exit)."""
    key = os.path.realpath(directory)
    with _HELD_GUARD:
        lock = _HELD.get(key)
        if lock is None or not lock.held:
            lock = RunLock(directory).acquire()
            _HELD[key] = lock
        lock.refs += 1
    if owner is not None:
        weakref.finalize(owner, release_run_lock, lock)
    return lock


def release_run_lock(lock: RunLock):
    """Drops one reference to `lock`, releasing it with the last one."""
    with _HELD_GUARD:
        lock.refs -= 1
        if lock.refs <= 0:
            lock.release()
            key = os.path.realpath(lock.directory)
            if _HELD.get(key) is lock:
                del _HELD[key]


def run_files(directory: str) -> List[str]:
    """What makes `directory` hold a run: a non-empty metrics.jsonl, checkpoints, final weights."""
    found = []
    metrics = os.path.join(directory, METRICS)
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        found.append(METRICS)
    checkpoints = os.path.join(directory, "checkpoints")
    if os.path.isdir(checkpoints) and any(n.startswith("epoch-") for n in os.listdir(checkpoints)):
        found.append("checkpoints/")
    if os.path.isdir(os.path.join(directory, "final")):
        found.append("final/")
    return found


def check_output_dir(directory) -> None:
    """A one-line `RunDirectoryError` for an output directory that names nothing (`--output_dir ''`)."""
    if not isinstance(directory, (str, os.PathLike)) or not str(directory).strip():
        raise RunDirectoryError(f"output_dir {directory!r} is empty: give a directory for the run (e.g. runs/my-run)")


def prepare_output_dir(directory: str, resume: bool, owner=None) -> RunLock:
    """Creates `directory`, locks it for this run and refuses to start a new run over an earlier one.

    Raises `RunDirectoryError` (one line) when the path is a file, when another process runs there, or when it
    already holds a run and `resume` is false (restarting there would mix two runs' metrics and checkpoints).
    """
    check_output_dir(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise RunDirectoryError(f"output_dir '{directory}' is a file, not a directory: choose another --output_dir")
    try:
        os.makedirs(directory, exist_ok=True)
    except FileExistsError:
        raise RunDirectoryError(f"output_dir '{directory}': a parent of it is a file, not a directory") from None
    except NotADirectoryError:
        raise RunDirectoryError(f"output_dir '{directory}': a parent of it is a file, not a directory") from None
    except OSError as e:
        if is_disk_error(e):
            raise output_error(f"the output directory '{directory}'", e) from e
        raise
    lock = acquire_run_lock(directory)
    if not resume:
        existing = run_files(directory)
        if existing == [METRICS]:  # a run stopped before its first checkpoint: nothing to continue, start over
            logger.info("%s holds the metrics of a run that stopped before its first checkpoint: starting over "
                        "(its %s is replaced)", directory, METRICS)
            write_metrics(os.path.join(directory, METRICS), [])
        elif existing:
            release_run_lock(lock)
            raise RunDirectoryError(
                f"output_dir '{directory}' already holds a run ({', '.join(existing)}): continue it with "
                f"--resume {directory}, or choose a new --output_dir"
            )
    if owner is not None:
        weakref.finalize(owner, release_run_lock, lock)
    return lock
