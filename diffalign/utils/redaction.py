"""Secrets and local paths kept out of everything a run writes or logs.

A run's configuration may hold credentials: an `Authorization` header for a reward behind a gateway, an API key of a
judge. They are needed at run time and nowhere else, so every writer (the run's `config.json`, `final/` with its
model card and config copy, tracker hyperparameters, the lock file, log lines and error messages) goes through
`redact` / `scrub`, which replace them by `MARKER`:

- every value of a `headers` mapping, at any depth (headers carry credentials: `Authorization`, `X-API-Key`, cookies);
- the value of every key named like a credential, case-insensitive and at any depth: a word `token`, `password`,
  `passwd`, `secret`, `auth`, `authorization`, `credential(s)`, `cookie`, `apikey`, or the pairs `api key`,
  `access key`, `private key` (`api_token`, `hf_token`, `X-Api-Key`, `authToken`, `db_password`; not `max_tokens`);
- the password of a URL (`https://user:<redacted>@host`) and URL query values named like a credential.

A value can also be marked secret by hand, in any `*_kwargs` (both forms are resolved only when the reward is built,
by `reveal`):

- `{"secret": "..."}`: the literal value, written everywhere as `{"secret": "<redacted>"}`;
- `"env:NAME"`: the value of the environment variable `NAME`; the written config keeps `"env:NAME"` (no secret in it,
  and a token rotated between a run and its resume does not change the run's configuration hash).

`reveal` remembers the real values it hands out, and `scrub` removes them (and each of their words of 8 or more
characters, such as the token of a `Bearer <token>` header) from any text: log lines through `RedactingFilter`, the
command line's error messages. `shareable` rewrites absolute paths relative to the run directory, so that what is
pushed to the Hub does not carry the user's home directory.
"""

import logging
import os
import re
import threading
from typing import Any, Iterable, List, Optional

from ..errors import UserError

MARKER = "<redacted>"
ENV_PREFIX = "env:"
SECRET_WRAPPER = "secret"

_SECRET_WORDS = frozenset({"token", "password", "passwd", "secret", "auth", "authorization", "credential",
                           "credentials", "cookie", "apikey", "passphrase"})
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")})
_NAME_SUFFIXES = frozenset({"env", "var", "variable", "file", "path"})
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:)(?P<password>[^/\s@]+)(?=@)")
_URL_QUERY = re.compile(r"(?P<head>[?&](?P<name>[^=&#\s]+)=)(?P<value>[^&#\s]+)")
_MIN_SCRUBBED = 4  # shorter values are not searched for in text: they would blank out ordinary words


class SecretError(UserError, ValueError):
    """A secret reference that cannot be resolved (`env:NAME` with `NAME` unset)."""


def is_secret_key(key) -> bool:
    """Whether a mapping key names a credential (see the module docstring for the words)."""
    words = [w.lower() for w in _WORD.findall(str(key))]
    if words and words[-1] in _NAME_SUFFIXES:  # names where a secret is kept (`api_key_env`), not the secret itself
        return False
    return any(w in _SECRET_WORDS for w in words) or any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


def _is_header_key(key) -> bool:
    return str(key).lower() == "headers"


def _scrub_url(text: str) -> str:
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MARKER, text)
    return _URL_QUERY.sub(lambda m: m["head"] + MARKER if is_secret_key(m["name"]) else m[0], text)


def _hidden(value) -> Any:
    # None and booleans carry no secret ("auth": false), nor does a reference to an environment variable: kept, so
    # that a written config stays readable and says where the secret comes from
    if value is None or isinstance(value, bool) or (isinstance(value, str) and value.startswith(ENV_PREFIX)):
        return value
    return MARKER


def redact(value: Any) -> Any:
    """A copy of `value` (nested mappings, lists, scalars) with every secret replaced by `MARKER`; pure."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if is_secret_key(key):
                out[key] = _hidden(item)
            elif _is_header_key(key) and isinstance(item, dict):
                out[key] = {name: _hidden(header) for name, header in item.items()}
            else:
                out[key] = redact(item)
        return out
    if isinstance(value, (list, tuple)):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return _scrub_url(value)
    return value


def _secret_strings(value: Any, secret: bool = False) -> List[str]:
    """The strings of `value` that `redact` hides (the real values, for `scrub`)."""
    if isinstance(value, dict):
        found = []
        for key, item in value.items():
            inner = secret or is_secret_key(key) or (_is_header_key(key) and isinstance(item, dict))
            found += _secret_strings(item, inner)
        return found
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _secret_strings(item, secret)]
    if isinstance(value, str):
        if secret:
            return [value]
        return [m["password"] for m in _URL_PASSWORD.finditer(value)] + [
            m["value"] for m in _URL_QUERY.finditer(value) if is_secret_key(m["name"])]
    if secret and isinstance(value, (int, float)) and not isinstance(value, bool):
        return [str(value)]
    return []


# ------------------------------------------------------------------ secrets known to this process, for text
_KNOWN: set = set()
_KNOWN_GUARD = threading.Lock()


def remember(values: Iterable[str]):
    """Adds real secret values to those `scrub` removes from text (with their words of 8 or more characters)."""
    with _KNOWN_GUARD:
        for value in values:
            value = str(value)
            for part in [value] + [w for w in re.split(r"[\s,;]+", value) if len(w) >= 8]:
                if len(part) >= _MIN_SCRUBBED:
                    _KNOWN.add(part)


def forget_all():
    """Forgets the remembered secrets (tests)."""
    with _KNOWN_GUARD:
        _KNOWN.clear()


def scrub(text: str, secrets: Optional[Iterable[str]] = None) -> str:
    """`text` with every remembered secret (and `secrets`), and URL passwords and credential query values, replaced
    by `MARKER`. Longer secrets first, so a token inside a header value goes with it."""
    with _KNOWN_GUARD:
        known = set(_KNOWN)
    known |= {s for s in (secrets or ()) if len(str(s)) >= _MIN_SCRUBBED}
    text = str(text)
    for secret in sorted(known, key=len, reverse=True):
        text = text.replace(secret, MARKER)
    return _scrub_url(text)


def reveal(kwargs: dict, where: str = "reward_kwargs") -> dict:
    """The real `kwargs` of a reward, for the call that builds it: `"env:NAME"` becomes the environment variable's
    value and `{"secret": value}` becomes `value`. Every hidden value is remembered for `scrub`. Raises `SecretError`
    (one line naming the setting) for an unset variable. Leaves `kwargs` untouched."""

    def resolve(value, path, secret):
        if isinstance(value, dict):
            if set(value) == {SECRET_WRAPPER}:
                inner = resolve(value[SECRET_WRAPPER], path, True)
                remember(_secret_strings(inner, True))
                return inner
            return {key: resolve(item, f"{path}.{key}",
                                 secret or is_secret_key(key) or (_is_header_key(key) and isinstance(item, dict)))
                    for key, item in value.items()}
        if isinstance(value, list):
            return [resolve(item, f"{path}[{i}]", secret) for i, item in enumerate(value)]
        if isinstance(value, str) and value.startswith(ENV_PREFIX):
            name = value[len(ENV_PREFIX):].strip()
            if name not in os.environ:
                raise SecretError(f"{path}: the environment variable {name!r} ({value!r}) is not set")
            remember([os.environ[name]])  # a value read from the environment is a secret by the user's choice
            return os.environ[name]
        if secret:
            remember(_secret_strings(value, True))
        else:
            remember(_secret_strings(value))
        return value

    revealed = resolve(dict(kwargs or {}), where, False)
    install_log_filter(logging.getLogger("diffalign"))
    return revealed


# ---------------------------------------------------------------------------------------------- log lines
class RedactingFilter(logging.Filter):
    """Scrubs every record's message (with its arguments filled in) of the remembered secrets."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's to report
            return True
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_filter(logger: logging.Logger):
    """Adds one `RedactingFilter` to `logger` (and to each of its handlers, which also see its children's records)."""
    for target in [logger] + list(logger.handlers):
        if not any(isinstance(f, RedactingFilter) for f in target.filters):
            target.addFilter(RedactingFilter())


# ------------------------------------------------------------------------------------------------ argv
def redact_argv(argv: List[str]) -> List[str]:
    """A command line with secrets hidden: the value of every `--*_kwargs` option is redacted as a mapping (or
    hidden whole when it is not one), the value of an option named like a credential is hidden, and the remembered
    secrets and the home directory are scrubbed from every word."""
    import yaml

    out, hide_next, kwargs_next = [], False, False
    for word in argv:
        word = str(word)
        if hide_next:
            out.append(MARKER)
        elif kwargs_next:
            out.append(_redact_mapping_text(word, yaml))
        else:
            name, eq, value = word.partition("=")
            if word.startswith("--") and eq:
                if is_secret_key(name):
                    word = f"{name}={MARKER}"
                elif _is_kwargs_option(name):
                    word = f"{name}={_redact_mapping_text(value, yaml)}"
            out.append(_home_free(scrub(word)))
            hide_next = word.startswith("--") and not eq and is_secret_key(word)
            kwargs_next = word.startswith("--") and not eq and _is_kwargs_option(word)
            continue
        hide_next = kwargs_next = False
    return out


def _is_kwargs_option(option: str) -> bool:
    return option.startswith("--") and option.replace("-", "_").endswith("_kwargs")


def _redact_mapping_text(text: str, yaml) -> str:
    import json

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return MARKER
    if not isinstance(value, dict):
        return MARKER if text.strip() else text
    return scrub(json.dumps(redact(value), default=str, separators=(",", ":")))


# ---------------------------------------------------------------------------------------------- paths
def _home_free(text: str) -> str:
    home = os.path.expanduser("~")
    if home and home not in ("/", "~") and len(home) > 1:
        text = text.replace(home, "~")
    return text


def shareable_path(path: str, run_dir: str) -> str:
    """`path` as it may appear in what is shared (the model card, the config copy pushed to the Hub): relative to
    the run directory; a path that would still name the home directory (a model in the home directory, a run outside
    it) is reduced to its last component."""
    absolute = os.path.abspath(os.path.expanduser(path))
    relative = os.path.relpath(absolute, os.path.abspath(run_dir))
    home = os.path.expanduser("~")
    if home and len(home) > 1:
        resolved = os.path.normpath(os.path.join(os.path.abspath(run_dir), relative))
        if os.path.basename(home) in relative.split(os.sep) and resolved.startswith(home):
            return os.path.basename(absolute.rstrip(os.sep)) or relative
    return relative


def _looks_like_path(text: str) -> bool:
    return os.path.isabs(text) or text.startswith("~" + os.sep) or text == "~"


def shareable(value: Any, run_dir: str, keep: Iterable[str] = ("prompts", "grid_prompts", "eval_prompts")) -> Any:
    """`redact(value)` with every absolute path (a string starting with `/` or `~/`) rewritten by `shareable_path`;
    the values of the top-level keys in `keep` (prompts are text, not paths) are only redacted."""
    keep = set(keep)

    def walk(item):
        if isinstance(item, dict):
            return {key: walk(inner) for key, inner in item.items()}
        if isinstance(item, list):
            return [walk(inner) for inner in item]
        if isinstance(item, str) and _looks_like_path(item):
            return shareable_path(item, run_dir)
        return item

    value = redact(value)
    if isinstance(value, dict):
        return {key: inner if key in keep else walk(inner) for key, inner in value.items()}
    return walk(value)
