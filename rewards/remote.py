"""A reward computed by an HTTP scoring server, so heavy reward models can live on another machine or environment.

Flow-GRPO (after ddpo-pytorch) keeps its OCR, GenEval and UnifiedReward scorers in separate servers for the same
reason: their dependencies conflict with the trainer's and their weights need a GPU of their own. Their clients pickle
JPEG bytes; this one speaks plain JSON with lossless PNGs, so any HTTP stack can serve it and nothing is unpickled.

Protocol (one POST per batch of at most `batch_size` images):

    request   {"images": ["<base64 PNG>", ...], "prompts": ["...", ...], "metadata": [{...}, ...] or null}
    answer    {"scores": [float, ...], "parts": {"<name>": [float, ...], ...}}     ("parts" optional)

Images are 8-bit RGB PNGs of the `[B, 3, H, W]` floats in [0, 1], rounded as diffusers' `numpy_to_pil` does. `scores`
holds one number per image, in order; `NaN` (Python's `json` writes it) or `null` marks an image the server could not
score and reaches the trainer's `nonfinite_policy` like a local reward's NaN. `parts` (e.g. a mixture's unweighted
parts) become `last_parts`, logged as `reward_<name>`. `python -m diffalign.rewards.serve` is a reference server.

The client uses only the standard library (`urllib.request`, `json`, `base64`). Its safety rules:

- `timeout` is a total deadline per try: connecting, sending and reading the whole answer. A watchdog closes the
  connection when it passes, so a server that trickles its answer a byte at a time fails like one that is silent.
- Redirects: a same-origin `307`/`308` (e.g. `/score` -> `/score/`) is followed with the same body and headers. A
  redirect to another origin (scheme, host or port) is refused, so the headers (an `Authorization` token) never reach
  a host they were not meant for; so is a `301`/`302`/`303`, which would turn the POST into a GET without its images.
  Either is one line naming the target: set `url` to it if it is right.
- A retried failure that then passes is logged as one line (what failed, how many tries, how long it took).
"""

import base64
import http.client
import io
import json
import logging
import math
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Dict, List, Optional

import torch
from PIL import Image

from . import RewardError, register_reward
from .jpeg import to_uint8_hwc

logger = logging.getLogger("diffalign")

# HTTP statuses worth another try: the server is overloaded, restarting or behind a proxy that is
RETRY_STATUSES = frozenset({429, 502, 503, 504})
DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str):
    """`(scheme, host, port)` of a URL, the port filled in for http/https: what must match for credentials to go."""
    parsed = urllib.parse.urlsplit(url)
    scheme = parsed.scheme.lower()
    try:
        port = parsed.port
    except ValueError:
        port = None
    return scheme, (parsed.hostname or "").lower(), port or DEFAULT_PORTS.get(scheme)


class _Deadline:
    """The sockets of one try, shut down together when the try's total deadline passes (from a timer thread), so
    that a blocked read returns at once however slowly the server trickles its answer."""

    def __init__(self, seconds: float):
        self.expired = False
        self._sockets = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self.expire)
        self._timer.daemon = True

    def watch(self, sock):
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)

    def expire(self):
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()


def _shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


def _watched(connection_class, deadline: _Deadline):
    """`connection_class` whose plain socket the deadline watches from the moment it is connected (before a TLS
    handshake, which a slow server could trickle too)."""

    class WatchedConnection(connection_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            create = self._create_connection

            def create_watched(*a, **k):
                sock = create(*a, **k)
                deadline.watch(sock)
                return sock

            self._create_connection = create_watched

    return WatchedConnection


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(_watched(http.client.HTTPConnection, self.deadline), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(_watched(http.client.HTTPSConnection, self.deadline), req, context=self._context)


class _RedirectRefused(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows only a same-origin 307/308 (method, body and headers kept); refuses every other redirect."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if origin(newurl) != origin(req.full_url):
            raise _RedirectRefused(f"redirected to another origin ({_short(newurl, 100)}, HTTP {code}); the client "
                                   f"does not send its headers there: set reward_kwargs.url to that address if it "
                                   f"is the right server")
        if code not in (307, 308):
            raise _RedirectRefused(f"redirected to {_short(newurl, 100)} with HTTP {code}, which would drop the "
                                   f"request's body; set reward_kwargs.url to that address")
        return urllib.request.Request(newurl, data=req.data, headers=dict(req.header_items()), method=req.get_method())


def encode_images(images: torch.Tensor) -> List[str]:
    """`[B, 3, H, W]` floats in [0, 1] -> base64 PNG strings (lossless for the 8-bit images a server sees)."""
    encoded = []
    for array in to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)  # fast; PNG is lossless at any level
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def _json_default(value):
    # metadata may hold numpy or torch scalars and arrays (e.g. GenEval boxes): their Python values, else their text
    for method in ("tolist", "item"):
        if hasattr(value, method):
            return getattr(value, method)()
    return str(value)


def _short(text, limit: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RemoteReward:
    """Posts images, prompts and metadata to a scoring server and returns its scores.

    Args:
        url (`str`):
            The server's endpoint, e.g. `http://gpu-box:8000/score`.
        timeout (`float`, *optional*, defaults to 30):
            Total seconds of one try: connecting, sending the batch and reading the whole answer.
        retries (`int`, *optional*, defaults to 2):
            Further tries after a refused or lost connection, a timeout, or HTTP 429/502/503/504, with exponential
            backoff (`backoff`, `2 * backoff`, ...). Other HTTP errors, refused redirects and malformed answers are
            not retried. A batch that passes after a retry is logged as one line.
        batch_size (`int`, *optional*, defaults to 64):
            Images per request.
        backoff (`float`, *optional*, defaults to 1):
            Seconds before the first retry.
        headers (`dict`, *optional*):
            Extra HTTP headers, e.g. `{"Authorization": "Bearer ..."}` for a server behind a gateway. They are sent
            to the origin of `url` only, and redacted from everything a run writes (write `"env:NAME"` to read one
            from the environment variable `NAME`).

    Every failure is a one-line `RewardError` naming the URL: not reachable, no answer in time, an HTTP error (with
    the server's message), invalid JSON, or a wrong count or non-numeric score.
    """

    # the advice of a "not reachable" error; a client of another kind of server (the VLM judge's) says its own
    unreachable_hint = "start it (python -m diffalign.rewards.serve --reward NAME --port PORT) or fix reward_kwargs.url"
    # calls that may be in flight at once from different threads (the trainers score the chunks of an epoch so,
    # `diffalign.rewards.scoring`): a call holds no shared state but `last_parts`, which is kept per thread
    concurrent_calls = 4

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 2, batch_size: int = 64, backoff: float = 1.0,
                 headers: Optional[Dict[str, str]] = None):
        parsed = urllib.parse.urlparse(str(url))
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise RewardError(f"reward 'remote': url must be http://host:port/path or https://...; got {url!r}")
        for name, value, low in (("timeout", timeout, 0.0), ("backoff", backoff, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low or math.isinf(value):
                raise RewardError(f"reward 'remote': {name} must be a finite number of seconds >= {low:g}; "
                                  f"got {value!r}")
        if timeout == 0:
            raise RewardError("reward 'remote': timeout must be > 0 seconds")
        for name, value, low in (("retries", retries, 0), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RewardError(f"reward 'remote': {name} must be an integer >= {low}; got {value!r}")
        self.url = str(url)
        self.timeout = float(timeout)
        self.retries = retries
        self.batch_size = batch_size
        self.backoff = float(backoff)
        self.headers = {"Content-Type": "application/json", "Accept": "application/json", **dict(headers or {})}
        self._thread = threading.local()

    @property
    def last_parts(self) -> Dict[str, torch.Tensor]:
        """The server's `parts` of this thread's last call."""
        return getattr(self._thread, "parts", {})

    @last_parts.setter
    def last_parts(self, parts: Dict[str, torch.Tensor]):
        self._thread.parts = parts

    def __call__(self, images: torch.Tensor, prompts: List[str],
                 metadata: Optional[List[dict]] = None) -> torch.Tensor:
        scores: List[float] = []
        parts: Dict[str, List[float]] = {}
        for start in range(0, len(images), self.batch_size):
            stop = min(start + self.batch_size, len(images))
            chunk_scores, chunk_parts = self.score_batch(images[start:stop], list(prompts[start:stop]),
                                                         None if metadata is None else list(metadata[start:stop]))
            if start and set(chunk_parts) != set(parts):
                raise RewardError(f"reward server {self.url} returned parts {sorted(chunk_parts)} for one batch and "
                                  f"{sorted(parts)} for another")
            scores += chunk_scores
            for name, values in chunk_parts.items():
                parts.setdefault(name, []).extend(values)
        self.last_parts = {name: torch.tensor(values, dtype=torch.float32) for name, values in parts.items()}
        return torch.tensor(scores, dtype=torch.float32)

    def score_batch(self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[dict]]):
        """One request: `(scores, {part: scores})` as lists of floats, checked against the number of images."""
        try:
            body = json.dumps({"images": encode_images(images), "prompts": prompts, "metadata": metadata},
                              default=_json_default).encode()
        except (TypeError, ValueError) as e:
            raise RewardError(f"reward 'remote': the prompts or metadata cannot be sent as JSON "
                              f"({_short(e)})") from None
        answer = self._post(body)
        if not isinstance(answer, dict) or not isinstance(answer.get("scores"), list):
            raise RewardError(f"reward server {self.url} answered {_short(json.dumps(answer), 80)}; expected "
                              f'{{"scores": [one number per image]}}')
        scores = self._numbers("scores", answer["scores"], len(images))
        parts = answer.get("parts") or {}
        if not isinstance(parts, dict):
            raise RewardError(f"reward server {self.url} answered 'parts' that is not a mapping of name to scores")
        return scores, {str(name): self._numbers(f"parts.{name}", values, len(images))
                        for name, values in parts.items()}

    def _numbers(self, what: str, values, count: int) -> List[float]:
        if not isinstance(values, list) or len(values) != count:
            got = f"{len(values)} values" if isinstance(values, list) else f"{type(values).__name__}"
            raise RewardError(f"reward server {self.url} returned {got} in '{what}' for {count} images; it must "
                              f"return one score per image")
        numbers = []
        for i, value in enumerate(values):
            if value is None:  # JSON has no NaN: null is how a strict server says "could not score this image"
                value = math.nan
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RewardError(f"reward server {self.url} returned a non-numeric score {_short(repr(value), 40)} "
                                  f"at index {i} of '{what}'")
            numbers.append(float(value))
        return numbers

    def _post(self, body: bytes):
        """POSTs `body`, retrying what may pass (refused or lost connections, timeouts, 429/5xx gateways); returns the
        decoded JSON answer or raises a one-line `RewardError`."""
        tries = self.retries + 1
        problem = ""
        started = time.monotonic()
        for attempt in range(tries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            outcome, value = self._try(body)
            if outcome == "answer":
                raw = value
                if attempt:  # the outage passed: say what was retried, once
                    logger.warning("reward server %s %s; it answered on try %d of %d, %.1f s after the first",
                                   self.url, problem, attempt + 1, tries, time.monotonic() - started)
                break
            problem = value
        else:
            hint = ("raise reward_kwargs.timeout or check the server" if "answer within" in problem else
                    self.unreachable_hint)
            raise RewardError(f"reward server {self.url} {problem} after {tries} {'try' if tries == 1 else 'tries'}; "
                              f"{hint}")
        try:
            return json.loads(raw)
        except ValueError as e:
            raise RewardError(f"reward server {self.url} answered invalid JSON ({_short(e, 60)}): "
                              f"{_short(raw[:200].decode(errors='replace'), 60)!r}") from None

    def _try(self, body: bytes):
        """One try within the total deadline `timeout`: `("answer", bytes)` or `("retry", what went wrong)`; raises
        `RewardError` for what no retry mends."""
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        late = f"did not answer within {self.timeout:g} s"
        with _Deadline(self.timeout) as deadline:
            opener = urllib.request.build_opener(_DeadlineHTTPHandler(deadline), _DeadlineHTTPSHandler(deadline),
                                                 _SameOriginRedirects())
            try:
                with opener.open(request, timeout=self.timeout) as response:
                    raw = response.read()
                if deadline.expired:  # an answer cut by the watchdog may look complete (no Content-Length)
                    return "retry", late
                return "answer", raw
            except _RedirectRefused as e:
                raise RewardError(f"reward server {self.url} {e.message}") from None
            except urllib.error.HTTPError as e:
                message = _server_message(e)
                if deadline.expired:
                    return "retry", late
                if e.code not in RETRY_STATUSES:
                    raise RewardError(f"reward server {self.url} answered HTTP {e.code} {e.reason}"
                                      f"{': ' + message if message else ''}") from None
                return "retry", f"answered HTTP {e.code} {e.reason}"
            except urllib.error.URLError as e:
                if isinstance(e.reason, _RedirectRefused):
                    raise RewardError(f"reward server {self.url} {e.reason.message}") from None
                reason = e.reason
                if deadline.expired or isinstance(reason, TimeoutError):
                    return "retry", late
                if isinstance(reason, ConnectionRefusedError):
                    return "retry", "is not reachable (connection refused)"
                if isinstance(reason, socket.gaierror):
                    raise RewardError(f"reward server {self.url}: unknown host ({_short(reason)})") from None
                return "retry", f"is not reachable ({_short(reason)})"
            except TimeoutError:  # socket.timeout
                return "retry", late
            except (ConnectionError, OSError, http.client.HTTPException) as e:
                # reset or closed mid-answer (RemoteDisconnected, IncompleteRead), or shut by the deadline
                return "retry", late if deadline.expired else f"dropped the connection ({type(e).__name__})"

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r}, timeout={self.timeout:g}, retries={self.retries})"


def _server_message(error: urllib.error.HTTPError) -> str:
    """The `error` of a JSON error body (the reference server's), else the body's first characters."""
    try:
        raw = error.read()
    except OSError:
        return ""
    try:
        data = json.loads(raw)
        if isinstance(data, dict) and "error" in data:
            return _short(data["error"], 200)
    except ValueError:
        pass
    return _short(raw[:200].decode(errors="replace"), 120)


@register_reward("remote")
def remote(url: str, timeout: float = 30.0, retries: int = 2, batch_size: int = 64, backoff: float = 1.0,
           headers: Optional[Dict[str, str]] = None) -> RemoteReward:
    """Scores from an HTTP server (see the module docstring for the protocol; `diffalign.rewards.serve` serves one)."""
    return RemoteReward(url, timeout=timeout, retries=retries, batch_size=batch_size, backoff=backoff, headers=headers)
