"""The operating system's processes: how many a launcher started, and whether a process id is still running."""

import os


def launched_processes() -> int:
    """The process count of `accelerate launch` / torchrun (`WORLD_SIZE`, 1 when unset or not a number), read before
    accelerate is imported."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (signal 0 checks without sending anything).

    `ESRCH` (`ProcessLookupError`) is the only answer that means gone. `EPERM` (`PermissionError`) means the process
    exists but belongs to another user; any other failure cannot tell. Both count as alive: the callers delete files
    or take over locks of dead processes only, so a doubt keeps them.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
