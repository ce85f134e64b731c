"""User errors: bad input that the CLI reports as one line with exit code 2 (not a bug), and the helpers that word them.

Every error type that means "the user gave something unusable" (a config value, a model directory, a prompt file, a
checkpoint, a reward, an output directory that cannot be written) is defined here and subclasses `UserError`, so
`diffalign.cli` catches exactly one class instead of a hand-kept list; the modules that raise them import them from
here (and so still export them: `diffalign.checkpoint.CheckpointError` is this `CheckpointError`). Subclasses keep their historical bases (`ValueError`, `ImportError`,
...) so existing `except ValueError` code keeps working.
"""

import errno as _errno


class UserError(Exception):
    """Bad input or an unusable environment, reported by the CLI as `diffalign: error: <message>` and exit code 2.

    The message must be one line that names the offending value and, where possible, what to do instead.
    """


class ConfigError(UserError, ValueError):
    """A user error in a configuration (reported as one line, exit code 2, by the CLI)."""


class ModelError(UserError, ValueError):
    """A model or weights location that cannot be used (reported as one line by the CLI)."""


class OutputError(UserError, OSError):
    """The output directory cannot be written (no space left, read-only, permissions)."""


class PromptError(UserError, ValueError):
    """Prompts that cannot be used (reported as one line by the CLI)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, incomplete, corrupted or from a different run configuration."""


class RunDirectoryError(UserError, ValueError):
    """The output directory is in use by another run, already holds a run, or is not a directory."""


class NonFiniteError(UserError, RuntimeError):
    """Too many non-finite rewards, losses or gradients in a row (or one, with `nonfinite_policy: error`)."""


class HubError(UserError, RuntimeError):
    """The upload to the Hub failed (offline, no token, no rights, HTTP error); the run's outputs are on disk."""


class TrackerError(UserError, ImportError):
    """A tracker named in `report_to` whose package is not installed."""


class LaunchConfigError(UserError, ValueError):
    """An unknown launch config name or a launch that cannot start."""


class RewardError(UserError, ValueError):
    """A reward that cannot be built from its settings, or that fails or returns something other than one finite
    or non-finite number per image (one line naming the reward)."""


class UnknownRewardError(RewardError):
    """A reward name that is neither registered nor an importable `module:function`."""


class RewardWeightsNotFoundError(UserError, ValueError):
    """A reward model's weights could not be found locally (and not downloaded, e.g. offline).

    The message is one line: the reward, what to download and which keyword argument to point at it.
    """


class MissingRewardDependencyError(UserError, ImportError):
    """A reward needs an optional dependency (an extra such as `diffalign[openclip]`) that is not installed."""


# OSError numbers that mean "the disk or the permissions", not a bug: reported as one line by the CLI.
OUTPUT_ERRNOS = frozenset(
    getattr(_errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EFBIG") if hasattr(_errno, name)
)


def is_disk_error(error: BaseException) -> bool:
    """True for a full disk, a read-only file system or missing permissions (an `OSError` or safetensors' error,
    which carries only the OS message)."""
    if isinstance(error, OSError) and error.errno in OUTPUT_ERRNOS:
        return True
    if type(error).__name__ == "SafetensorError":
        text = str(error)
        return any(m in text for m in ("No space left", "Read-only file system", "Permission denied", "Disk quota"))
    return False


def output_error(what: str, error: BaseException) -> OutputError:
    """An `OutputError` for `error` raised while writing `what` (a path), as one line."""
    detail = (error.strerror or str(error)) if isinstance(error, OSError) else str(error)
    detail = detail.strip().splitlines()[0] if detail and detail.strip() else type(error).__name__
    code = getattr(error, "errno", None)
    result = OutputError(f"cannot write {what}: {detail}")
    result.errno = code
    return result


def first_line(error: BaseException, limit: int = 300, with_type: bool = True) -> str:
    """The first line of an exception's message, for one-line reports: `TypeName: first line` (`with_type=False`: the
    line alone), cut to `limit` characters with `...`; the type name alone when the message is empty."""
    text = str(error).strip()
    text = text.splitlines()[0].strip() if text else ""
    if not text:
        return type(error).__name__
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if with_type else text


def did_you_mean(word: str, candidates, prefix: str = "") -> str:
    """`"; did you mean '<prefix><closest>'?"` for the candidate closest to `word` (difflib), or `""` when none is
    close. Dashes and underscores count as the same character (`--sample-num-steps` is `sample_num_steps`)."""
    import difflib

    normal = {str(c).replace("-", "_"): str(c) for c in candidates}
    match = difflib.get_close_matches(word.replace("-", "_"), list(normal), n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{normal[match[0]]}'?" if match else ""
