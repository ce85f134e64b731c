"""The reference reward server's bounds (`diffalign.rewards.serve`), probed with raw sockets on 127.0.0.1: request
bodies that lie about or hide their length, concurrent bodies over the memory budget, small images that decode huge,
deeply nested JSON, idle and slow clients, a burst of connections, and the command line. Limits are tiny where a test
exercises one, so nothing allocates more than a few megabytes.

Tests that take `ServerLimits` import it inside (`small`), so on a server without it only those tests fail."""

import base64
import io
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager

import pytest
import torch

from diffalign.rewards.remote import encode_images
from diffalign.rewards.serve import make_server

def small(**overrides):
    from diffalign.rewards.serve import ServerLimits

    return ServerLimits(**overrides)


@contextmanager
def serving(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def post(port, body: bytes, timeout=10.0):
    """(status, decoded JSON answer) of a POST /score."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def request_body(n=3, size=16, **extra) -> bytes:
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    prompts = [f"prompt {i}" for i in range(n)]
    return json.dumps({"images": encode_images(images), "prompts": prompts, **extra}).encode()


def raw(port, data: bytes, timeout=5.0) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if data:
        connection.sendall(data)
    return connection


def read_answer(connection) -> bytes:
    """What the server sends until it closes the connection or the socket's timeout passes with nothing more."""
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
            if b"\r\n\r\n" in received:
                head, _, rest = received.partition(b"\r\n\r\n")
                length = re.search(rb"Content-Length: (\d+)", head, re.I)
                if length and len(rest) >= int(length.group(1)):
                    break
    except TimeoutError:
        if not received:
            raise
    return received


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def png_of_zeros(width: int, height: int, rgb: bool = False) -> bytes:
    """A valid PNG of a black `width` x `height` image, built row by row (the image is never in memory): a few KB
    of file for any number of pixels, a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (3 * width if rgb else (width + 7) // 8))  # filter byte 0, then zeros
    compressor = zlib.compressobj(9)
    rows_per_piece = max(1, (1 << 20) // len(row))
    pixels = b"".join(compressor.compress(row * min(rows_per_piece, height - start))
                      for start in range(0, height, rows_per_piece)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8 if rgb else 1, 2 if rgb else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def peak_rss_growth_mb(action) -> float:
    """MB by which the process's peak resident memory grows while `action()` runs (Linux: VmHWM, reset first)."""
    def peak_kb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = peak_kb()
    action()
    return (peak_kb() - before) / 1024


# -- request bodies ------------------------------------------------------------------------------------------------

def test_content_length_minus_one_is_refused_at_once():
    """The standard-library server read `Content-Length: -1` as "until the connection closes" (1.2 GiB in the
    report); the answer must be a 400 while the client still holds the connection open."""
    with serving(make_server("jpeg_compressibility", port=0, device="cpu")) as port:
        start = time.perf_counter()
        with raw(port, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n" + b"[" * 10000) as c:
            answer = read_answer(c)
        assert status_of(answer) == 400 and time.perf_counter() - start < 3, answer[:200]


def test_chunked_and_oversized_bodies_are_cut_at_the_limit_with_bounded_memory():
    """A chunked body is counted as it arrives and refused (413) once past `max_body_bytes`: the server holds about
    the limit, never the 16 MB the client offers. A declared length over the limit is refused before reading, a POST
    without any body gets 411."""
    limit = 64 << 10
    server = make_server("jpeg_compressibility", port=0, device="cpu", limits=small(max_body_bytes=limit))
    with serving(server) as port:
        piece = b"x" * (64 << 10)
        tracemalloc.start()
        try:
            with raw(port, b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n") as c:
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
                c.settimeout(0.05)
                answer = b""
                for _ in range(256):  # up to 16 MB, until the server answers
                    c.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                    try:
                        answer = c.recv(65536)
                        break
                    except TimeoutError:
                        pass
                c.settimeout(5)
                answer = answer or read_answer(c)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert status_of(answer) == 413 and b"--max-body-mb" in answer, answer[:300]
        assert peak < 8 * limit, f"{peak} bytes traced while refusing a chunked body over {limit}"

        with raw(port, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (limit + 1)) as c:
            answer = read_answer(c)  # nothing of the body was sent: refused on the header alone
        assert status_of(answer) == 413 and b"over the limit of 65536" in answer, answer[:300]
        with raw(port, b"POST /score HTTP/1.1\r\nHost: x\r\n\r\n") as c:
            assert status_of(read_answer(c)) == 411


def test_concurrent_bodies_share_one_memory_budget():
    """`max_concurrent_bytes` bounds the bodies of all requests together: while one request of 600 KB is being scored
    in a 1 MiB budget, a second of 600 KB waits `queue_timeout` and gets 503 (which the client retries); a third of
    100 KB fits and is served after the first."""
    release = threading.Event()
    seen = []

    def slow_reward(images, prompts, metadata=None):
        seen.append(len(images))
        release.wait(10)
        return torch.zeros(len(images))

    server = make_server(slow_reward, port=0, device="cpu",
                         limits=small(max_body_bytes=1 << 20, max_concurrent_bytes=1 << 20, queue_timeout=0.5))
    big = request_body(metadata=[{"pad": "x" * 200_000}] * 3)  # 600 KB
    results = {}
    with serving(server) as port:
        first = threading.Thread(target=lambda: results.setdefault("first", post(port, big)))
        first.start()
        deadline = time.time() + 5
        while not seen and time.time() < deadline:
            time.sleep(0.01)
        try:
            start = time.perf_counter()
            status, answer = post(port, big)
            waited = time.perf_counter() - start
            assert status == 503 and "--max-concurrent-mb" in answer["error"], (status, answer)
            assert 0.4 < waited < 3, waited
            third = threading.Thread(target=lambda: results.setdefault("third", post(port, request_body())))
            third.start()
            time.sleep(0.3)
            assert "third" not in results  # admitted, and waiting for the one worker
        finally:
            release.set()
        first.join(10)
        third.join(10)
        assert results["first"][0] == 200 and results["third"][0] == 200, results
        assert len(big) + len(request_body()) <= server.budget.peak <= 1 << 20
        assert server.budget.in_use == 0


# -- images --------------------------------------------------------------------------------------------------------

def test_decompression_bomb_is_refused_before_decoding():
    """A 24 KB PNG of 14000 x 14000 pixels (196 megapixels) gets 413 naming the pixel limit; the standard-library
    server answered 500 (PIL's DecompressionBombError)."""
    bomb = base64.b64encode(png_of_zeros(14_000, 14_000)).decode()
    body = json.dumps({"images": [bomb], "prompts": ["a"]}).encode()
    assert len(body) < 40_000
    with serving(make_server("jpeg_compressibility", port=0, device="cpu")) as port:
        status, answer = post(port, body)
    assert status == 413 and "196000000 pixels" in answer["error"] and "--max-pixels" in answer["error"], answer


def test_pixel_limit_counts_the_request_and_allocates_nothing():
    """`max_pixels` bounds the pixels of one request's images together, read from their headers: a 4000 x 4000 RGB
    PNG (under PIL's own bomb threshold; decoding it would take over 250 MB: PIL's 64 MB, the 8-bit array and the
    float batch) is refused with no growth of peak memory, and three 16 x 16 images pass a limit of 768 but not
    767."""
    image = base64.b64encode(png_of_zeros(4000, 4000, rgb=True)).decode()
    body = json.dumps({"images": [image], "prompts": ["a"]}).encode()
    server = make_server("jpeg_compressibility", port=0, device="cpu", limits=small(max_pixels=1_000_000))
    with serving(server) as port:
        results = []
        growth = peak_rss_growth_mb(lambda: results.append(post(port, body)))
        status, answer = results[0]
        assert status == 413 and "4000x4000" in answer["error"], answer
        assert growth < 40, f"peak memory grew by {growth:.0f} MB refusing a 16-megapixel image"
    for limit, expected in ((768, 200), (767, 413)):
        with serving(make_server("jpeg_compressibility", port=0, device="cpu", limits=small(max_pixels=limit))) as p:
            status, answer = post(p, request_body())
        assert status == expected, (limit, answer)
    assert "image 2 is 16x16" in answer["error"]


def test_only_png_jpeg_and_webp_are_opened():
    gif = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    body = json.dumps({"images": [base64.b64encode(gif.getvalue()).decode()], "prompts": ["a"]}).encode()
    with serving(make_server("jpeg_compressibility", port=0, device="cpu")) as port:
        status, answer = post(port, body)
    assert status == 400 and "image 0 is not a base64-encoded image (PNG, JPEG, WEBP" in answer["error"], answer


# -- JSON ----------------------------------------------------------------------------------------------------------

def test_deeply_nested_json_gets_400():
    """100 000 nested arrays: the standard-library server died on RecursionError and sent nothing."""
    body = b"[" * 100_000 + b"]" * 100_000
    with serving(make_server("jpeg_compressibility", port=0, device="cpu")) as port:
        status, answer = post(port, body)
        assert status == 400 and "deeper than 64 levels" in answer["error"], answer
        assert post(port, request_body())[0] == 200  # and the server still serves


def test_json_shape_scan():
    from diffalign.rewards.serve import BadRequest, RequestTooLarge, check_json_shape

    check_json_shape(b"[" * 64 + b"]" * 64, max_depth=64, max_items=1000)
    with pytest.raises(BadRequest, match="deeper than 64"):
        check_json_shape(b"[" * 65 + b"]" * 65, max_depth=64, max_items=1000)
    # brackets inside strings, escaped quotes included, do not nest
    check_json_shape(json.dumps({"a": ["[{" * 100, '\\"[[[' * 50]}).encode(), max_depth=3, max_items=1000)
    with pytest.raises(BadRequest, match="deeper than 3"):
        check_json_shape(json.dumps({"a": ['"', [[["x"]]]]}).encode(), max_depth=3, max_items=1000)
    # many small values: a small body that would parse into far more memory
    with pytest.raises(RequestTooLarge, match="--max-json-items"):
        check_json_shape(b"[" + b"[]," * 2000 + b"[]]", max_depth=64, max_items=1000)
    start = time.perf_counter()
    with pytest.raises(BadRequest):
        check_json_shape(b'["' + b"x" * (20 << 20) + b'", ' + b"[" * 1000 + b"]" * 1000 + b"]", 64, 100_000)
    assert time.perf_counter() - start < 5  # a 20 MB string is skipped in C (a Python loop over it takes far longer)


# -- connections ---------------------------------------------------------------------------------------------------

def test_idle_slow_and_kept_alive_connections_are_closed():
    """With keep-alive 0.5 s and read timeout 0.5 s: a connection that sends nothing, one that trickles its headers,
    and one idle after an answer are closed; a body that stalls gets 408. The standard-library server kept every one
    open for ever."""
    limits = small(keepalive_timeout=0.5, read_timeout=0.5)
    with serving(make_server("jpeg_compressibility", port=0, device="cpu", limits=limits)) as port:
        start = time.perf_counter()
        with raw(port, b"") as silent:
            assert silent.recv(100) == b""
        with raw(port, b"POST /score HTTP/1.1\r\n") as trickle:
            trickle.settimeout(0.2)
            closed = False
            for _ in range(20):
                try:
                    trickle.sendall(b"X")
                    closed = trickle.recv(100) == b""
                except TimeoutError:
                    continue
                except OSError:  # reset: closed as well
                    closed = True
                if closed:
                    break
            assert closed
        with raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n") as kept:
            assert status_of(read_answer(kept)) == 200
            assert kept.recv(100) == b""  # closed by the server after the keep-alive
        with raw(port, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"images\"") as stalled:
            answer = read_answer(stalled)
        assert status_of(answer) == 408 and b"--read-timeout" in answer, answer
        assert time.perf_counter() - start < 6


def test_a_burst_of_50_clients_is_served():
    """50 clients connect at once, then each posts a batch: every one gets its scores (a listen backlog of 5
    reset most of them)."""
    body = request_body()
    barrier = threading.Barrier(50)
    results = []

    def client(port):
        try:
            barrier.wait(10)
            results.append(post(port, body, timeout=30)[0])
        except Exception as e:  # noqa: BLE001 - the test counts every kind of failure
            results.append(type(e).__name__)

    server = make_server("jpeg_compressibility", port=0, device="cpu")
    with serving(server) as port:
        threads = [threading.Thread(target=client, args=(port,)) for _ in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert results == [200] * 50, sorted(map(str, results))
    assert server.limits.backlog >= 128


def test_hostile_connections_leave_no_tracebacks(caplog, capfd):
    """Clients that vanish mid-request, reset the connection, send garbage or a bad length: each is at most one log
    line, never a traceback (the standard-library server printed one per dropped connection)."""
    caplog.set_level(logging.DEBUG)
    body = request_body()
    with serving(make_server("jpeg_compressibility", port=0, device="cpu")) as port:
        for data in (b"", b"POST /score HTTP/1.1\r\nHost: x\r\n", b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
                     b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                     b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{",
                     b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:100]):
            for reset in (False, True):
                connection = raw(port, data)
                if reset:  # RST instead of FIN
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                time.sleep(0.05)
                connection.close()
        time.sleep(0.3)
        assert post(port, body)[0] == 200
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, tracebacks
    assert "Traceback" not in capfd.readouterr().err


# -- command line --------------------------------------------------------------------------------------------------

def test_help_lists_the_bounds(capsys):
    from diffalign.rewards.serve import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    for flag in ("--host", "--port", "--max-body-mb", "--max-concurrent-mb", "--max-pixels", "--max-json-depth",
                 "--read-timeout", "--keepalive-timeout", "--queue-timeout", "--backlog", "--shutdown-timeout"):
        assert flag in text, flag


@pytest.mark.parametrize("args, expected", [
    (["--max-body-mb", "0"], "--max-body-mb must be a number of MiB > 0"),
    (["--max-body-mb", "8", "--max-concurrent-mb", "4"], "--max-concurrent-mb (4) must be at least --max-body-mb"),
    (["--max-pixels", "-1"], "--max-pixels must be an integer > 0"),
    (["--read-timeout", "inf"], "--read-timeout must be a finite number of seconds > 0"),
])
def test_bad_bounds_are_one_line(args, expected, capsys):
    from diffalign.rewards.serve import main

    assert main(["--reward", "jpeg_compressibility", "--port", "0", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err, err


def test_missing_aiohttp_is_one_line(monkeypatch, capsys):
    from diffalign.rewards.serve import main

    monkeypatch.setitem(sys.modules, "aiohttp", None)  # import aiohttp now raises ImportError
    codes = []
    # in a thread: a server that does not need aiohttp would start serving instead of returning
    thread = threading.Thread(target=lambda: codes.append(main(["--reward", "jpeg_compressibility", "--port", "0"])),
                              daemon=True)
    thread.start()
    thread.join(30)
    assert codes == [2]
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and 'pip install "diffalign[serve]"' in err, err


def test_command_logs_startup_and_stops_on_sigterm():
    """`python -m diffalign.rewards.serve` says where it listens and with which bounds, answers, and on SIGTERM says
    it stops and exits 0."""
    process = subprocess.Popen(
        [sys.executable, "-m", "diffalign.rewards.serve", "--reward", "jpeg_compressibility", "--port", "0",
         "--device", "cpu", "--max-body-mb", "8", "--max-concurrent-mb", "16"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        deadline = time.time() + 60
        while time.time() < deadline and not any("serving reward" in line for line in lines):
            lines.append(process.stderr.readline())
        started = next(line for line in lines if "serving reward" in line)
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/score", started).group(1))
        assert "8 MiB per body, 16 MiB of bodies at once" in started, started
        assert post(port, request_body())[0] == 200
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=30)[1]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, rest
    assert "shutting down (SIGTERM)" in rest and "stopped after 1 requests" in rest, rest
    assert "Traceback" not in rest


def test_handle_request_body_is_the_protocol_for_other_stacks():
    """`handle_request_body` (what docs/serving.md wraps in Ray Serve and LitServe) answers what the server does."""
    from diffalign.rewards import get_reward
    from diffalign.rewards.serve import handle_request_body

    reward_fn = get_reward("jpeg_compressibility")
    body = request_body()
    status, answer = handle_request_body(reward_fn, body, name="jpeg_compressibility")
    with serving(make_server("jpeg_compressibility", port=0, device="cpu")) as port:
        assert (status, answer) == post(port, body)
    assert status == 200 and len(answer["scores"]) == 3
    assert handle_request_body(reward_fn, b"[" * 100 + b"]" * 100)[0] == 400
    assert handle_request_body(reward_fn, body, limits=small(max_pixels=100))[0] == 413


def test_a_client_that_hangs_up_keeps_its_bytes_reserved_until_the_worker_lets_go():
    """The budget counts a body for as long as the worker holds it: a client that hangs up mid-scoring does not
    free room for another body while its own is still in memory."""
    release = threading.Event()
    started = threading.Event()

    def slow_reward(images, prompts, metadata=None):
        started.set()
        release.wait(10)
        return torch.zeros(len(images))

    server = make_server(slow_reward, port=0, device="cpu")
    body = request_body()
    with serving(server) as port:
        try:
            with raw(port, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body):
                assert started.wait(10)
            time.sleep(0.3)  # the server has seen the hang-up
            assert server.budget.in_use == len(body)
        finally:
            release.set()
        deadline = time.time() + 5
        while server.budget.in_use and time.time() < deadline:
            time.sleep(0.02)
        assert server.budget.in_use == 0


def test_threads_flag_is_checked_and_applied(capsys, monkeypatch):
    """`--threads` follows the rule of diffalign's other commands: a whole number >= 1, one line otherwise."""
    import torch

    from diffalign.rewards import serve

    assert serve.main(["--reward", "jpeg_compressibility", "--threads", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "num_threads" in err and ">= 1" in err, err
    before = torch.get_num_threads()
    monkeypatch.setattr(serve, "make_server", lambda *a, **k: (_ for _ in ()).throw(serve.UserError("stop here")))
    try:
        assert serve.main(["--reward", "jpeg_compressibility", "--threads", "1"]) == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
