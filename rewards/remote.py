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

The client uses only the standard library (`urllib.request`, `json`, `base64`).
"""

import base64
import io
import json
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Dict, List, Optional

import torch
from PIL import Image

from . import RewardError, register_reward
from .jpeg import to_uint8_hwc

# HTTP statuses worth another try: the server is overloaded, restarting or behind a proxy that is
RETRY_STATUSES = frozenset({429, 502, 503, 504})


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
            Seconds to wait for the connection and for each read of the answer.
        retries (`int`, *optional*, defaults to 2):
            Further tries after a refused or lost connection, a timeout, or HTTP 429/502/503/504, with exponential
            backoff (`backoff`, `2 * backoff`, ...). Other HTTP errors and malformed answers are not retried.
        batch_size (`int`, *optional*, defaults to 64):
            Images per request.
        backoff (`float`, *optional*, defaults to 1):
            Seconds before the first retry.
        headers (`dict`, *optional*):
            Extra HTTP headers, e.g. `{"Authorization": "Bearer ..."}` for a server behind a gateway.

    Every failure is a one-line `RewardError` naming the URL: not reachable, no answer in time, an HTTP error (with
    the server's message), invalid JSON, or a wrong count or non-numeric score.
    """

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
        self.last_parts: Dict[str, torch.Tensor] = {}

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
        for attempt in range(tries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as e:
                message = _server_message(e)
                if e.code not in RETRY_STATUSES:
                    raise RewardError(f"reward server {self.url} answered HTTP {e.code} {e.reason}"
                                      f"{': ' + message if message else ''}") from None
                problem = f"answered HTTP {e.code} {e.reason}"
            except urllib.error.URLError as e:
                reason = e.reason
                if isinstance(reason, TimeoutError):
                    problem = f"did not answer within {self.timeout:g} s"
                elif isinstance(reason, ConnectionRefusedError):
                    problem = "is not reachable (connection refused)"
                elif isinstance(reason, socket.gaierror):
                    raise RewardError(f"reward server {self.url}: unknown host ({_short(reason)})") from None
                else:
                    problem = f"is not reachable ({_short(reason)})"
            except TimeoutError:  # socket.timeout
                problem = f"did not answer within {self.timeout:g} s"
            except (ConnectionError, OSError) as e:  # reset or closed mid-answer (http.client.RemoteDisconnected)
                problem = f"dropped the connection ({type(e).__name__})"
        else:
            hint = ("raise reward_kwargs.timeout or check the server" if "answer within" in problem else
                    "start it (python -m diffalign.rewards.serve --reward NAME --port PORT) or fix reward_kwargs.url")
            raise RewardError(f"reward server {self.url} {problem} after {tries} {'try' if tries == 1 else 'tries'}; "
                              f"{hint}")
        try:
            return json.loads(raw)
        except ValueError as e:
            raise RewardError(f"reward server {self.url} answered invalid JSON ({_short(e, 60)}): "
                              f"{_short(raw[:200].decode(errors='replace'), 60)!r}") from None

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
