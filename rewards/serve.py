"""Reference scoring server for the `remote` reward: any diffalign reward behind HTTP, on aiohttp, with bounded memory.

    pip install "diffalign[serve]"
    python -m diffalign.rewards.serve --reward pickscore --port 8000 --reward_kwargs '{device: cuda}'
    # on the training machine:
    diffalign train prdp ... --reward remote --reward_kwargs '{url: http://gpu-box:8000/score}'

`POST /score` (any path) takes `{"images": [base64 PNG], "prompts": [...], "metadata": [...] | null}` and answers
`{"scores": [...]}`, plus `"parts"` when the reward is a mixture; `GET /health` answers `{"status": "ok", "reward":
...}`. Every error is `{"error": "<one line>"}`, which the client shows: 400 a request that breaks the protocol, 408 a
body that does not arrive within `read_timeout`, 411 a POST without a body, 413 a request over a size limit, 503 a
server whose memory budget stays full for `queue_timeout` (the client retries 503), 500 a failing reward.

Bounds (`ServerLimits`, each a command-line flag; docs/serving.md explains them):

- request bodies: at most `max_body_bytes` each, counted as they arrive (a `Content-Length` cannot lie its way past
  it: aiohttp's parser rejects a malformed one, a chunked body is cut at the limit), and at most
  `max_concurrent_bytes` held by all requests together (a chunked body reserves `max_body_bytes`, its worst case);
- decoded images: the pixels of a request's images, read from their headers before anything is decoded, at most
  `max_pixels`;
- JSON: at most `max_json_depth` levels and `max_json_items` values, checked by a linear scan before parsing;
- time: a body must arrive within `read_timeout`; an idle connection (also one that never completes its headers)
  closes after `keepalive_timeout`; the listen backlog is `backlog`.

Requests are parsed, decoded and scored one at a time in one worker thread (one model, one device), so at most one
request's decoded images exist at once; the event loop only receives bodies and sends answers.

There is no authentication: the server listens on 127.0.0.1 unless `--host` says otherwise; expose it only on a
network you trust, or behind a gateway that checks the `headers` the client can send.
"""

import argparse
import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import io
import json
import logging
import math
import re
import signal
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image

from diffalign.errors import UserError, first_line

logger = logging.getLogger("diffalign.rewards.serve")

MiB = 1 << 20
# Formats a client may send: the protocol says PNG; JPEG and WebP are what other clients send. Anything else (EPS
# runs Ghostscript, TIFF and friends have large decoders) is refused before PIL looks further than the magic bytes.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


class ServeError(UserError):
    """The server cannot start as asked (a missing dependency, a bad limit): one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What one server process may take in, each bound a command-line flag (shown in brackets).

    Args:
        max_body_bytes (`int`, defaults to 256 MiB) [`--max-body-mb`]:
            Bytes of one request body. A batch of 64 1024-px generated images is about 100-200 MB of base64 PNG.
        max_concurrent_bytes (`int`, defaults to 512 MiB) [`--max-concurrent-mb`]:
            Bytes of request bodies held by all requests together, from the first byte read to the answer. A request
            reserves its `Content-Length` (a chunked one `max_body_bytes`) before reading; one that finds no room
            waits up to `queue_timeout`, then gets 503.
        max_pixels (`int`, defaults to 64 * 1024 * 1024) [`--max-pixels`]:
            Pixels of one request's images together (64 images of 1024 x 1024), read from the image headers before
            any is decoded. The request being scored holds 15 bytes per pixel (8-bit RGB and the float32 batch).
        max_json_depth (`int`, defaults to 64) [`--max-json-depth`]:
            Nesting levels of arrays and objects (the protocol needs 3, metadata a few more).
        max_json_items (`int`, defaults to 100 000) [`--max-json-items`]:
            Commas plus opening brackets of a body, an upper bound on its JSON values: parsed JSON takes up to about
            200 bytes per value, so this bounds what a small body of `[[],[],...]` could grow to.
        read_timeout (`float`, defaults to 60) [`--read-timeout`]:
            Seconds for a whole request body to arrive (a total, not per read): a client that trickles gets 408.
        keepalive_timeout (`float`, defaults to 15) [`--keepalive-timeout`]:
            Seconds an idle connection stays open, counted from its opening or its last answer: a connection that
            sends nothing, or never finishes its headers, is closed then.
        queue_timeout (`float`, defaults to 10) [`--queue-timeout`]:
            Seconds a request waits for room in `max_concurrent_bytes` before 503.
        backlog (`int`, defaults to 1024) [`--backlog`]:
            Connections the kernel queues before the server accepts them (Linux caps it at `net.core.somaxconn`).
        shutdown_timeout (`float`, defaults to 30) [`--shutdown-timeout`]:
            Seconds requests in flight get to finish on SIGINT/SIGTERM before their connections are closed.
    """

    max_body_bytes: int = 256 * MiB
    max_concurrent_bytes: int = 512 * MiB
    max_pixels: int = 64 * 1024 * 1024
    max_json_depth: int = 64
    max_json_items: int = 100_000
    read_timeout: float = 60.0
    keepalive_timeout: float = 15.0
    queue_timeout: float = 10.0
    backlog: int = 1024
    shutdown_timeout: float = 30.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            integral = field.type in (int, "int")
            valid_type = isinstance(value, int) if integral else isinstance(value, (int, float))
            if isinstance(value, bool) or not valid_type or not value > 0 or math.isinf(value):
                kind = "an integer" if integral else "a finite number of seconds"
                raise ServeError(f"{FLAGS[field.name]} must be {kind} > 0; got {value!r}")
        if self.max_concurrent_bytes < self.max_body_bytes:
            raise ServeError(f"--max-concurrent-mb ({self.max_concurrent_bytes / MiB:g}) must be at least "
                             f"--max-body-mb ({self.max_body_bytes / MiB:g}): one request must fit")


# the command-line flag of each limit, for messages
FLAGS = {"max_body_bytes": "--max-body-mb", "max_concurrent_bytes": "--max-concurrent-mb",
         "max_pixels": "--max-pixels", "max_json_depth": "--max-json-depth", "max_json_items": "--max-json-items",
         "read_timeout": "--read-timeout", "keepalive_timeout": "--keepalive-timeout",
         "queue_timeout": "--queue-timeout", "backlog": "--backlog", "shutdown_timeout": "--shutdown-timeout"}


class BadRequest(ValueError):
    """A request that does not follow the protocol (HTTP 400)."""

    status = 400


class RequestTooLarge(BadRequest):
    """A request over one of the size limits (HTTP 413)."""

    status = 413


# A JSON string (escapes included; the unrolled loop is linear) or one bracket: what the depth scan must tell apart.
_JSON_STRING_OR_BRACKET = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def check_json_shape(body: bytes, max_depth: int, max_items: int) -> None:
    """Raises `RequestTooLarge` when `body` holds more than `max_items` commas plus opening brackets (an upper bound on
    its JSON values), and `BadRequest` when its arrays and objects nest deeper than `max_depth`.

    Runs before `json.loads`, without recursion, in time linear in `len(body)`: counting is done by `bytes.count`, and
    the depth scan (needed only when the body has more opening brackets than `max_depth`) visits each string and
    bracket once; brackets inside strings do not nest. Brackets and commas inside strings count as items, so the
    bound errs on the safe side.
    """
    openings = body.count(b"[") + body.count(b"{")
    items = openings + body.count(b",")
    if items > max_items:
        raise RequestTooLarge(f"the request holds {items} JSON values (commas and brackets), over the limit of "
                              f"{max_items} (--max-json-items)")
    if openings <= max_depth:
        return
    depth = 0
    for match in _JSON_STRING_OR_BRACKET.finditer(body):
        bracket = body[match.start()]
        if bracket in b"[{":
            depth += 1
            if depth > max_depth:
                raise BadRequest(f"the request's JSON nests deeper than {max_depth} levels (--max-json-depth)")
        elif bracket in b"]}":
            depth -= 1


def parse_request(body, max_depth: int = 64, max_items: int = 100_000):
    """The JSON value of a request body, after `check_json_shape`; `BadRequest` for anything that is not JSON."""
    check_json_shape(body, max_depth, max_items)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise BadRequest(f"the request is not valid JSON ({first_line(e)})") from None


def open_image(data: bytes, index: int, max_pixels: Optional[int] = None) -> Image.Image:
    """The lazily opened image of `data` (only its header is read), one of `IMAGE_FORMATS`."""
    try:
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:  # over twice PIL's MAX_IMAGE_PIXELS: refused by PIL on its header
        limit = f"; the limit is {max_pixels} pixels per request (--max-pixels)" if max_pixels else ""
        raise RequestTooLarge(f"image {index} is too large to decode ({e}){limit}") from None
    except (ValueError, OSError) as e:  # UnidentifiedImageError is an OSError
        raise BadRequest(f"image {index} is not a base64-encoded image ({', '.join(IMAGE_FORMATS)}; "
                         f"{type(e).__name__})") from None


def decode_images(encoded, device="cpu", max_pixels: Optional[int] = None) -> torch.Tensor:
    """Base64 PNG (JPEG, WebP) strings -> float `[B, 3, H, W]` in [0, 1] on `device`.

    Each image's size is read from its header first, and the request is refused (`RequestTooLarge`) when the images
    hold more than `max_pixels` pixels together, before any pixel is decoded: a small PNG can declare a huge image.
    """
    if not isinstance(encoded, list) or not encoded:
        raise BadRequest("'images' must be a non-empty list of base64-encoded PNGs")
    opened = []
    total_pixels = 0
    for i, text in enumerate(encoded):
        try:
            data = base64.b64decode(text, validate=True)
        except (TypeError, ValueError, binascii.Error) as e:
            raise BadRequest(f"image {i} is not a base64-encoded image ({type(e).__name__})") from None
        image = open_image(data, i, max_pixels)
        width, height = image.size
        total_pixels += width * height
        if max_pixels is not None and total_pixels > max_pixels:
            raise RequestTooLarge(f"image {i} is {width}x{height}: the request's images hold {total_pixels} pixels "
                                  f"or more, over the limit of {max_pixels} (--max-pixels); send fewer or smaller "
                                  f"images per request (the client's batch_size)")
        opened.append(image)
    sizes = {image.size for image in opened}
    if len(sizes) > 1:
        raise BadRequest(f"the images of one request must have one size; got "
                         f"{sorted((h, w) for w, h in sizes)}")
    width, height = opened[0].size
    batch = np.empty((len(opened), height, width, 3), dtype=np.uint8)
    for i, image in enumerate(opened):
        try:
            with image:
                batch[i] = np.asarray(image.convert("RGB"))
        except (ValueError, OSError) as e:  # truncated or corrupt data: the header was fine, the pixels are not
            raise BadRequest(f"image {i} is not a base64-encoded image ({type(e).__name__})") from None
    return torch.from_numpy(batch).permute(0, 3, 1, 2).to(device=device, dtype=torch.float32).div_(255)


def _finite_or_none(values):
    # strict JSON has no NaN/inf; the client reads null as NaN, so any JSON reader can parse the answer
    return [v if math.isfinite(v) else None for v in values]


def score_request(reward_fn, request, name: str = "reward", device="cpu", max_pixels: Optional[int] = None) -> dict:
    """The answer to one parsed request: validates it, decodes its images within `max_pixels`, scores them."""
    from diffalign.rewards import call_reward

    if not isinstance(request, dict):
        raise BadRequest('expected a JSON object {"images": [...], "prompts": [...], "metadata": [...]}')
    encoded, prompts, metadata = request.get("images"), request.get("prompts"), request.get("metadata")
    if not isinstance(encoded, list) or not encoded:
        raise BadRequest("'images' must be a non-empty list of base64-encoded PNGs")
    count = len(encoded)
    if not (isinstance(prompts, list) and len(prompts) == count and all(isinstance(p, str) for p in prompts)):
        raise BadRequest(f"'prompts' must be a list of {count} strings, one per image")
    if metadata is not None and (not isinstance(metadata, list) or len(metadata) != count):
        raise BadRequest(f"'metadata' must be null or a list of {count} entries, one per image")
    images = decode_images(encoded, device, max_pixels)
    scores = call_reward(reward_fn, images, prompts, metadata, name=name)
    parts = {part: torch.as_tensor(values, dtype=torch.float32).reshape(-1).tolist()
             for part, values in getattr(reward_fn, "last_parts", {}).items()}
    answer = {"scores": _finite_or_none(scores.tolist())}
    if parts:
        answer["parts"] = {part: _finite_or_none(values) for part, values in parts.items()}
    return answer


def handle_request_body(reward_fn, body, name: str = "reward", device="cpu",
                        limits: Optional[ServerLimits] = None) -> Tuple[int, dict]:
    """HTTP status and JSON answer of one `POST /score` body, within `limits` (JSON shape, pixels): the wire protocol
    in one call, so another HTTP stack (Ray Serve, LitServe; docs/serving.md) serves a reward through it. Call it
    from one thread at a time per `reward_fn`."""
    limits = limits or ServerLimits()
    try:
        request = parse_request(body, limits.max_json_depth, limits.max_json_items)
        return 200, score_request(reward_fn, request, name, device, limits.max_pixels)
    except BadRequest as e:
        return e.status, {"error": str(e)}
    except UserError as e:  # the reward's own one-line error (RewardError: wrong output, failure)
        logger.warning("reward error: %s", e)
        return 500, {"error": str(e)}
    except Exception as e:
        logger.exception("reward %s failed", name)
        return 500, {"error": f"reward '{name}' failed: {first_line(e)}"}


def _import_aiohttp():
    try:
        from aiohttp import web
    except ImportError:
        raise ServeError('the reward server needs aiohttp: pip install "diffalign[serve]"') from None
    return web


class BudgetTimeout(Exception):
    """No room in the byte budget within the wait allowed."""


class ByteBudget:
    """At most `capacity` bytes reserved at once; reservations are granted in arrival order (a large one is not
    starved by smaller ones behind it). Used from one event loop."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_use = 0
        self.peak = 0  # the most bytes ever reserved at once, for tests and the shutdown line
        self._waiters = collections.deque()  # [size, future], oldest first

    async def acquire(self, size: int, timeout: float):
        """Reserves `size` bytes, waiting behind earlier reservations; `BudgetTimeout` after `timeout` seconds."""
        if not self._waiters and self.in_use + size <= self.capacity:
            self._take(size)
            return
        entry = [size, asyncio.get_running_loop().create_future()]
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(entry[1]), timeout)
        except BaseException as e:
            if entry[1].done():  # granted just as the wait ended: give it back
                self.release(size)
            else:
                entry[1].cancel()
                self._waiters.remove(entry)
                self._grant()  # a waiter that gave up may have blocked smaller ones behind it
            if isinstance(e, asyncio.TimeoutError):
                raise BudgetTimeout() from None
            raise

    def _take(self, size: int):
        self.in_use += size
        self.peak = max(self.peak, self.in_use)

    def release(self, size: int):
        self.in_use -= size
        self._grant()

    def _grant(self):
        while self._waiters and self.in_use + self._waiters[0][0] <= self.capacity:
            size, future = self._waiters.popleft()
            self._take(size)
            future.set_result(None)


class _ClientErrorsAsOneLine(logging.LoggerAdapter):
    """aiohttp's server log, with a client's malformed request or dropped connection as one line (INFO, or DEBUG
    where aiohttp logs at DEBUG) instead of a traceback: a broken or hostile client is not a server fault. Anything
    else keeps its traceback."""

    @staticmethod
    def _from_client(exc_info) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        return isinstance(exc_info, (HttpProcessingError, ConnectionError, asyncio.TimeoutError))

    def _one_line(self, level, msg, args, error):
        if self.logger.isEnabledFor(level):
            text = " ".join(f"{type(error).__name__}: {error}".split())
            self.logger.log(level, "%s: %s", str(msg) % args, text[:300])

    def exception(self, msg, *args, exc_info=True, **kwargs):
        if self._from_client(exc_info):
            self._one_line(logging.INFO, msg, args, exc_info)
        else:
            self.logger.error(msg, *args, exc_info=exc_info, **kwargs)

    def debug(self, msg, *args, exc_info=None, **kwargs):
        if self._from_client(exc_info):
            self._one_line(logging.DEBUG, msg, args, exc_info)
        else:
            self.logger.debug(msg, *args, exc_info=exc_info, **kwargs)


class RewardServer:
    """Serves `reward_fn(images, prompts, metadata)` over HTTP on aiohttp, within `limits`.

    Binds and listens on construction (`server_address` holds the port when `port=0`). `serve_forever()` runs the
    event loop in the calling thread until `shutdown()` (from another thread) or, with `handle_signals`,
    SIGINT/SIGTERM; `server_close()` closes the socket. The names follow `socketserver` so the two are
    interchangeable in tests.
    """

    def __init__(self, address: Tuple[str, int], reward_fn, name: str = "reward", device="cpu",
                 limits: Optional[ServerLimits] = None, access_log: bool = False, latency: float = 0.0):
        _import_aiohttp()
        if isinstance(latency, bool) or not isinstance(latency, (int, float)) or not 0 <= latency < math.inf:
            raise ServeError(f"--latency must be a finite number of seconds >= 0; got {latency!r}")
        # seconds each answer is held back without holding the worker: a stand-in for the network and queueing
        # latency of a real remote reward (for benchmarks: requests in flight together wait together)
        self.latency = float(latency)
        self.reward_fn = reward_fn
        self.reward_label = name
        self.device = device
        self.limits = limits or ServerLimits()
        self.access_log = access_log
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=self.limits.backlog)
        self.server_address = self.socket.getsockname()
        self.budget = ByteBudget(self.limits.max_concurrent_bytes)
        self.requests_served = 0
        # one worker: parsing, decoding and scoring happen one request at a time (the memory bound relies on it)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self._state = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop_event: Optional[asyncio.Event] = None
        self._stop_requested = False
        self._stop_reason = "shutdown()"
        self._done = threading.Event()
        self.started = threading.Event()  # set once the server accepts connections

    # -- running ---------------------------------------------------------------------------------------------------
    def serve_forever(self, poll_interval: Optional[float] = None, handle_signals: bool = False):
        """Serves until `shutdown()` (`poll_interval` is accepted for `socketserver` compatibility and unused)."""
        with self._state:
            if self._stop_requested:
                return
            self._done.clear()
            loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(handle_signals))
        finally:
            with self._state:
                self._loop = None
            loop.close()
            self._done.set()

    def shutdown(self):
        """Stops `serve_forever` (from another thread) and waits for it: no new connections, requests in flight get
        `limits.shutdown_timeout` seconds."""
        with self._state:
            self._stop_requested = True
            loop = self._loop
            if loop is not None:
                loop.call_soon_threadsafe(self._wake)
        if loop is not None:
            self._done.wait()

    def server_close(self):
        self.socket.close()
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _wake(self, reason: Optional[str] = None):
        self._stop_requested = True
        if reason:
            self._stop_reason = reason
        if self._stop_event is not None:
            self._stop_event.set()

    async def _serve(self, handle_signals: bool):
        web = _import_aiohttp()
        limits = self.limits
        self._stop_event = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._dispatch)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            shutdown_timeout=limits.shutdown_timeout,
            keepalive_timeout=limits.keepalive_timeout,
            access_log=logging.getLogger(f"{logger.name}.access") if self.access_log else None,
            logger=_ClientErrorsAsOneLine(logging.getLogger(f"{logger.name}.http"), {}),
            handler_cancellation=True,  # a client that hangs up is not scored: its queued work is dropped
            auto_decompress=False,  # a gzip body is not JSON; inflating it would bypass the size limits
        )
        await runner.setup()
        loop = asyncio.get_running_loop()
        if handle_signals:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, self._wake, signal.Signals(signum).name)
        try:
            await web.SockSite(runner, self.socket, backlog=limits.backlog).start()
            self.started.set()
            if not self._stop_requested:
                await self._stop_event.wait()
            logger.info("shutting down (%s): no new connections; requests in flight get up to %g s",
                        self._stop_reason, limits.shutdown_timeout)
        finally:
            await runner.cleanup()
            if handle_signals:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(signum)
        logger.info("stopped after %d requests (at most %.1f MiB of request bodies held at once)",
                    self.requests_served, self.budget.peak / MiB)

    # -- requests --------------------------------------------------------------------------------------------------
    async def _dispatch(self, request):
        if request.method in ("GET", "HEAD"):
            return self._answer(200, {"status": "ok", "reward": self.reward_label})
        if request.method != "POST":
            return self._answer(405, {"error": f"method {request.method} is not supported: POST images to /score, "
                                               f"GET /health"}, headers={"Allow": "GET, HEAD, POST"})
        return await self._score_request(request)

    async def _score_request(self, request):
        limits = self.limits
        length = request.content_length  # None for a chunked body or none at all; aiohttp refuses a malformed one
        if length is None and not request.body_exists:
            return self._answer(411, {"error": "a POST needs a body with a Content-Length header (or chunked)"})
        if length is not None and length > limits.max_body_bytes:
            return self._answer(413, {"error": f"request of {length} bytes is over the limit of "
                                               f"{limits.max_body_bytes} (--max-body-mb)"})
        reserved = limits.max_body_bytes if length is None else length
        try:
            await self.budget.acquire(reserved, limits.queue_timeout)
        except BudgetTimeout:
            return self._answer(503, {"error": f"server busy: request bodies fill its memory budget of "
                                               f"{limits.max_concurrent_bytes} bytes (--max-concurrent-mb) for "
                                               f"{limits.queue_timeout:g} s; retry later"})
        job = None
        try:
            try:
                body = await asyncio.wait_for(self._read_body(request), limits.read_timeout)
            except asyncio.TimeoutError:
                return self._answer(408, {"error": f"the request body did not arrive within "
                                                   f"{limits.read_timeout:g} s (--read-timeout)"}, close=True)
            except BadRequest as e:
                return self._answer(e.status, {"error": str(e)})
            if self.latency:
                await asyncio.sleep(self.latency)
            job = self._worker.submit(self._handle, body)
            del body
            status, payload = await asyncio.wrap_future(job)
        finally:
            self._release_when_done(job, reserved)
        self.requests_served += 1
        return self._answer(status, payload)

    def _release_when_done(self, job, reserved: int):
        """Gives the request's bytes back to the budget once the worker no longer holds its body: now, unless the
        client hung up while its job was running (a job still queued is cancelled with the request)."""
        if job is None or job.done() or job.cancel():
            self.budget.release(reserved)
            return
        loop = asyncio.get_running_loop()

        def release(_):
            with contextlib.suppress(RuntimeError):  # the loop closed first: nothing is waiting for the bytes
                loop.call_soon_threadsafe(self.budget.release, reserved)

        job.add_done_callback(release)

    async def _read_body(self, request) -> bytearray:
        """The whole body, refused (`RequestTooLarge`) as soon as it passes `max_body_bytes`."""
        from aiohttp import ClientPayloadError
        from aiohttp.http_exceptions import HttpProcessingError

        limit = self.limits.max_body_bytes
        body = bytearray()
        try:
            while True:
                chunk = await request.content.readany()
                if not chunk:
                    return body
                body += chunk
                if len(body) > limit:
                    raise RequestTooLarge(f"request body over the limit of {limit} bytes (--max-body-mb)")
        except (ClientPayloadError, HttpProcessingError) as e:  # a malformed chunked body
            raise BadRequest(f"the request body is malformed ({first_line(e)})") from None

    def _handle(self, body) -> Tuple[int, dict]:
        return handle_request_body(self.reward_fn, body, name=self.reward_label, device=self.device,
                                   limits=self.limits)

    def score(self, request) -> dict:
        """The answer to one parsed request (`score_request` with this server's reward, device and pixel limit)."""
        return score_request(self.reward_fn, request, self.reward_label, self.device, self.limits.max_pixels)

    @staticmethod
    def _answer(status: int, payload: dict, headers=None, close: bool = False):
        from aiohttp import web

        # bytes, not `json_response`: the same body and Content-Type (no charset) as the standard-library server
        response = web.Response(status=status, body=json.dumps(payload).encode(), content_type="application/json",
                                headers=headers)
        if close:
            response.force_close()
        return response


def make_server(reward, host: str = "127.0.0.1", port: int = 8000, device: Optional[str] = None, *,
                limits: Optional[ServerLimits] = None, access_log: bool = False, latency: float = 0.0,
                **reward_kwargs) -> RewardServer:
    """A `RewardServer` for `reward` (a name, `module:function`, mixture, or a callable) within `limits`; `port=0`
    picks a free port (`server.server_address[1]`). Call `serve_forever()` (in a thread, for tests) and
    `shutdown()`. `latency` holds each answer back that many seconds (a benchmark's slow remote reward)."""
    from diffalign.rewards import get_reward, reward_name

    _import_aiohttp()  # before loading a reward model: a missing dependency should not cost that wait
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    reward_fn = reward if callable(reward) else get_reward(reward, **reward_kwargs)
    return RewardServer((host, port), reward_fn, name=reward_name(reward_fn, None if callable(reward) else reward),
                        device=device, limits=limits, access_log=access_log, latency=latency)


def _limits_from_args(args) -> ServerLimits:
    def mebibytes(value, flag):
        if not (isinstance(value, float) and value > 0 and math.isfinite(value)):
            raise ServeError(f"{flag} must be a number of MiB > 0; got {value!r}")
        return max(1, int(value * MiB))

    return ServerLimits(max_body_bytes=mebibytes(args.max_body_mb, "--max-body-mb"),
                        max_concurrent_bytes=mebibytes(args.max_concurrent_mb, "--max-concurrent-mb"),
                        max_pixels=args.max_pixels, max_json_depth=args.max_json_depth,
                        max_json_items=args.max_json_items, read_timeout=args.read_timeout,
                        keepalive_timeout=args.keepalive_timeout, queue_timeout=args.queue_timeout,
                        backlog=args.backlog, shutdown_timeout=args.shutdown_timeout)


def build_parser() -> argparse.ArgumentParser:
    default = ServerLimits()
    parser = argparse.ArgumentParser(prog="python -m diffalign.rewards.serve", description=__doc__.split("\n")[0],
                                     epilog="Bounds and how to serve at scale: docs/serving.md.")
    parser.add_argument("--reward", required=True,
                        help="reward name, module:function or a YAML {name: weight} mixture")
    parser.add_argument("--reward_kwargs", "--reward-kwargs", default="{}",
                        help="YAML mapping of the reward's options")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one) [%(default)s]")
    parser.add_argument("--device", default=None, help="device of the images (default cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for scoring (default: torch's own; 1 is fastest for small scorers such "
                             "as the digits ones on a shared CPU, as diffalign's other commands run the bundled models)")
    limits = parser.add_argument_group("bounds")
    limits.add_argument("--max-body-mb", type=float, default=default.max_body_bytes / MiB,
                        help="MiB of one request body [%(default)g]")
    limits.add_argument("--max-concurrent-mb", type=float, default=default.max_concurrent_bytes / MiB,
                        help="MiB of request bodies held by all requests together; a request that finds no room "
                             "waits --queue-timeout, then gets 503 [%(default)g]")
    limits.add_argument("--max-pixels", type=int, default=default.max_pixels,
                        help="pixels of one request's images together, checked before decoding [%(default)d]")
    limits.add_argument("--max-json-depth", type=int, default=default.max_json_depth,
                        help="nesting levels of the request's JSON [%(default)d]")
    limits.add_argument("--max-json-items", type=int, default=default.max_json_items,
                        help="JSON values (commas plus brackets) of one request [%(default)d]")
    limits.add_argument("--read-timeout", type=float, default=default.read_timeout,
                        help="seconds for a whole request body to arrive, else 408 [%(default)g]")
    limits.add_argument("--keepalive-timeout", type=float, default=default.keepalive_timeout,
                        help="seconds before an idle connection (or one with unfinished headers) is closed "
                             "[%(default)g]")
    limits.add_argument("--queue-timeout", type=float, default=default.queue_timeout,
                        help="seconds a request waits for room under --max-concurrent-mb before 503 [%(default)g]")
    limits.add_argument("--backlog", type=int, default=default.backlog,
                        help="listen backlog: connections queued before they are accepted [%(default)d]")
    limits.add_argument("--shutdown-timeout", type=float, default=default.shutdown_timeout,
                        help="seconds requests in flight get to finish on SIGINT/SIGTERM [%(default)g]")
    parser.add_argument("--access-log", action="store_true", help="log one line per request")
    parser.add_argument("--latency", type=float, default=0.0,
                        help="hold each answer back SECONDS without holding the scoring worker: a remote reward of "
                             "known latency, for benchmarks (docs/bench.md) [%(default)g]")
    return parser


def main(argv=None) -> int:
    import yaml

    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    try:
        _import_aiohttp()
        limits = _limits_from_args(args)
        if args.threads is not None:
            from diffalign.utils.torch_utils import apply_torch_threads

            apply_torch_threads(args.reward, args.threads)
        spec = yaml.safe_load(args.reward)
        kwargs = yaml.safe_load(args.reward_kwargs) or {}
        if not isinstance(kwargs, dict):
            raise UserError(f"--reward_kwargs must be a YAML mapping; got {args.reward_kwargs!r}")
        # PIL's own bomb check as a second line behind the header check: it warns past this and refuses past twice it
        Image.MAX_IMAGE_PIXELS = limits.max_pixels
        server = make_server(spec if isinstance(spec, dict) else args.reward, args.host, args.port, args.device,
                             limits=limits, access_log=args.access_log, latency=args.latency, **kwargs)
    except (UserError, yaml.YAMLError, OSError) as e:
        print(f"diffalign.rewards.serve: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    logger.info("serving reward %s on http://%s:%d/score (device %s); bounds: %g MiB per body, %g MiB of bodies at "
                "once, %d pixels per request, JSON depth %d, %g s to read a body, %g s keep-alive, backlog %d",
                server.reward_label, host, port, server.device, limits.max_body_bytes / MiB,
                limits.max_concurrent_bytes / MiB, limits.max_pixels, limits.max_json_depth, limits.read_timeout,
                limits.keepalive_timeout, limits.backlog)
    try:
        server.serve_forever(handle_signals=True)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
