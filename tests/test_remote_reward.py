"""The `remote` reward against servers started here on 127.0.0.1: the reference server (`diffalign.rewards.serve`)
wrapping a local reward, and canned servers that are slow, down or answer something wrong. Each failure must be one
line, after the configured retries, never a hang."""

import json
import math
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from diffalign.rewards import RewardError, call_reward, get_reward
from diffalign.rewards.serve import make_server

PROMPTS = ["a cat", "a dog", "a fox"]


def images(n=3, size=16, seed=0):
    # smooth and noisy images: distinct JPEG sizes, so equal scores are not a coincidence
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, 3, size, size, generator=g)
    ramp = torch.linspace(0, 1, size).expand(n, 3, size, size)
    mix = torch.linspace(0, 1, n).view(n, 1, 1, 1)
    return mix * noise + (1 - mix) * ramp


@contextmanager
def serving(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/score"
    finally:
        server.shutdown()
        server.server_close()


def canned(answer, status=200, delay=0.0):
    """A server that answers every POST with `answer` (bytes or a JSON-able value) after `delay` seconds."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(delay)
            body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up (timeout) and closed the connection
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    return serving(server)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_remote_scores_equal_the_local_scorer():
    x = images(5)
    local = get_reward("jpeg_compressibility")(x, PROMPTS + ["b", "c"])
    with serving(make_server("jpeg_compressibility", port=0, device="cpu")) as url:
        reward = get_reward("remote", url=url, batch_size=2)  # three requests: 2 + 2 + 1 images
        remote = call_reward(reward, x, PROMPTS + ["b", "c"], [{"group_id": i} for i in range(5)])
    assert torch.equal(remote, local), (remote, local)  # PNG is lossless: the server scores the same 8-bit images
    assert reward.last_parts == {}


def test_remote_mixture_parts_and_nan_reach_the_trainer():
    """A mixture's parts come back as `last_parts` (logged as reward_<name>); a NaN score passes through (the
    trainer's nonfinite_policy handles it, as for a local reward)."""
    x = images()
    with serving(make_server({"jpeg_compressibility": 2.0, "jpeg_incompressibility": 1.0}, port=0,
                             device="cpu")) as url:
        reward = get_reward("remote", url=url)
        total = reward(x, PROMPTS)
    size = get_reward("jpeg_incompressibility")(x, PROMPTS)
    assert torch.allclose(total, -size) and torch.equal(reward.last_parts["jpeg_incompressibility"], size)
    with canned({"scores": [1.0, float("nan"), None]}) as url:
        scores = get_reward("remote", url=url)(x, PROMPTS)
    assert scores[0] == 1.0 and math.isnan(scores[1]) and math.isnan(scores[2])


def test_server_down_is_one_line_quickly():
    url = f"http://127.0.0.1:{closed_port()}/score"
    reward = get_reward("remote", url=url, retries=1, backoff=0.05)
    start = time.perf_counter()
    with pytest.raises(RewardError) as error:
        reward(images(), PROMPTS)
    message = str(error.value)
    assert time.perf_counter() - start < 2
    assert "\n" not in message and url in message and "connection refused" in message and "after 2 tries" in message


def test_slow_server_times_out_after_the_retries():
    with canned({"scores": [0.0] * 3}, delay=1.0) as url:
        reward = get_reward("remote", url=url, timeout=0.2, retries=1, backoff=0.05)
        start = time.perf_counter()
        with pytest.raises(RewardError) as error:
            reward(images(), PROMPTS)
        elapsed = time.perf_counter() - start
    message = str(error.value)
    assert 0.4 <= elapsed < 1.5, elapsed  # two tries of 0.2 s and one backoff, never the server's 1 s
    assert "\n" not in message and "did not answer within 0.2 s after 2 tries" in message


@pytest.mark.parametrize("answer, expected", [
    ({"scores": [1.0, 2.0]}, "returned 2 values in 'scores' for 3 images"),
    ({"scores": [1.0, "high", 2.0]}, "non-numeric score 'high' at index 1"),
    ({"scores": [1.0, True, 2.0]}, "non-numeric score True at index 1"),
    ({"score": [1.0, 2.0, 3.0]}, "expected {\"scores\""),
    ({"scores": [1.0, 2.0, 3.0], "parts": {"a": [1.0]}}, "in 'parts.a' for 3 images"),
    (b"<html>oops</html>", "answered invalid JSON"),
])
def test_wrong_answers_are_one_line(answer, expected):
    with canned(answer) as url, pytest.raises(RewardError) as error:
        get_reward("remote", url=url, retries=0)(images(), PROMPTS)
    assert "\n" not in str(error.value) and expected in str(error.value), str(error.value)


def test_http_errors_carry_the_servers_message():
    def broken(images, prompts, metadata=None):
        raise RuntimeError("CUDA out of memory")

    message = "HTTP 500 Internal Server Error: reward '.*broken' failed: RuntimeError: CUDA out of memory"
    with serving(make_server(broken, port=0, device="cpu")) as url, pytest.raises(RewardError, match=message):
        get_reward("remote", url=url, retries=3)(images(), PROMPTS)  # not retried: a 500 is not transient
    with canned({"error": "busy"}, status=503) as url:  # an overloaded server or gateway: retried
        reward = get_reward("remote", url=url, retries=1, backoff=0.01)
        with pytest.raises(RewardError, match="answered HTTP 503 Service Unavailable after 2 tries"):
            reward(images(), PROMPTS)


@pytest.mark.parametrize("kwargs, expected", [
    ({"url": "gpu-box:8000/score"}, "url must be http://"),
    ({"url": "http://h:1/s", "timeout": 0}, "timeout must be > 0"),
    ({"url": "http://h:1/s", "retries": -1}, "retries must be an integer >= 0"),
    ({"url": "http://h:1/s", "batch_size": 0}, "batch_size must be an integer >= 1"),
])
def test_bad_settings_are_one_line(kwargs, expected):
    with pytest.raises(RewardError, match=expected):
        get_reward("remote", **kwargs)


def test_reference_server_rejects_bad_requests():
    import urllib.error
    import urllib.request

    with serving(make_server("jpeg_compressibility", port=0, device="cpu")) as url:
        with urllib.request.urlopen(url.replace("/score", "/health"), timeout=5) as response:
            assert json.load(response) == {"status": "ok", "reward": "jpeg_compressibility"}
        for body, expected in ((b"{", "not valid JSON"), (b'{"images": ["nope"], "prompts": ["a"]}', "image 0 is not"),
                               (b'{"images": [], "prompts": []}', "non-empty list")):
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=5)
            assert error.value.code == 400 and expected in json.load(error.value)["error"]


def test_training_with_a_remote_reward(tiny_model_dir, tmp_path, capsys):
    """`reward: remote` from the command line: a short run scores through the reference server (and its metadata, the
    group ids, travels as JSON); the same run against a closed port stops with one line and exit code 2."""
    from diffalign.cli import main

    args = ["train", "ddpo", "--model", tiny_model_dir, "--prompts", "[a cat, a dog]", "--num_epochs", "1",
            "--sample_num_steps", "2", "--sample_num_prompts_per_epoch", "2", "--sample_images_per_prompt", "2",
            "--train_batch_size", "2", "--grid_num_images", "1", "--reward", "remote"]
    with serving(make_server("jpeg_compressibility", port=0, device="cpu")) as url:
        code = main(args + ["--output_dir", str(tmp_path / "run"), "--reward_kwargs", f"{{url: {url}, timeout: 10}}"])
    assert code == 0
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        record = json.loads(f.readline())
    assert record["reward_mean"] < 0  # -(JPEG size in kB), computed by the server
    capsys.readouterr()
    url = f"http://127.0.0.1:{closed_port()}/score"
    code = main(args + ["--output_dir", str(tmp_path / "down"), "--reward_kwargs", f"{{url: {url}, retries: 0}}"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffalign: error:")]
    assert code == 2 and len(errors) == 1 and "connection refused" in errors[0], errors


# ---------------------------------------------------------------- the client's safety: redirects, deadline, retries
def recording_server(status=200, location=None, answer=None):
    """A server that records each request's path and headers, and answers `status` (with `Location: location`) or
    `answer` (JSON scores for as many images as were sent)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "headers": dict(self.headers)})
            if location is not None and (status != 307 or self.path == "/score"):
                self.send_response(status)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = json.dumps(answer or {"scores": [float(i) for i in range(len(body["images"]))]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    return server, seen


def test_a_redirect_to_another_origin_is_refused_and_gets_no_credentials():
    target, target_seen = recording_server()
    with serving(target) as target_url:
        for status in (302, 307, 308):
            source, _ = recording_server(status=status, location=target_url)
            with serving(source) as url:
                reward = get_reward("remote", url=url, retries=2, backoff=0.01,
                                    headers={"Authorization": "Bearer tok-0123456789"})
                with pytest.raises(RewardError) as error:
                    reward(images(), PROMPTS)
            message = str(error.value)
            assert "\n" not in message and "another origin" in message and target_url in message, message
    assert target_seen == []  # nothing, and so no Authorization header, reached the other port


def test_same_origin_redirects():
    """A 307/308 on the same origin (a trailing slash) is followed with the body and headers; a 302 would turn the
    POST into a bodiless GET: refused, one line."""
    server, seen = recording_server(status=307, location="/score/")
    with serving(server) as url:
        reward = get_reward("remote", url=url, headers={"Authorization": "Bearer tok-0123456789"})
        assert reward(images(), PROMPTS).tolist() == [0.0, 1.0, 2.0]
    assert [r["path"] for r in seen] == ["/score", "/score/"]
    assert seen[1]["headers"]["Authorization"] == "Bearer tok-0123456789"
    server, seen = recording_server(status=302, location="/elsewhere")
    with serving(server) as url, pytest.raises(RewardError, match="HTTP 302, which would drop the request's body"):
        get_reward("remote", url=url)(images(), PROMPTS)
    assert len(seen) == 1


def trickling_server(phase: str, interval: float = 0.2):
    """A server that sends its answer one byte every `interval` seconds, from the status line on (`phase` "head")
    or after complete headers (`phase` "body"): each read is quick, the whole answer would take ~40 s."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"scores": [0.0] * 3}).encode() + b" " * 150
            head = (f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nContent-Type: application/json\r\n\r\n"
                    .encode())
            if phase == "body":
                self.wfile.write(head)
                self.wfile.flush()
                head = b""
            try:
                for i in range(len(head + body)):
                    self.wfile.write((head + body)[i : i + 1])
                    self.wfile.flush()
                    time.sleep(interval)
            except OSError:  # the client gave up
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    return serving(server)


@pytest.mark.parametrize("phase", ["head", "body"])
def test_a_trickling_server_fails_at_the_total_deadline(phase):
    with trickling_server(phase) as url:
        reward = get_reward("remote", url=url, timeout=0.6, retries=0)
        start = time.perf_counter()
        with pytest.raises(RewardError) as error:
            reward(images(), PROMPTS)
        elapsed = time.perf_counter() - start
    message = str(error.value)
    assert 0.5 <= elapsed < 1.5, elapsed  # the deadline, not 40 s of trickle
    assert "\n" not in message and "did not answer within 0.6 s after 1 try" in message, message


def test_an_outage_that_passes_is_one_log_line(caplog):
    """The server comes up while the client backs off: the batch is scored, and one line says what was retried."""
    port = closed_port()
    url = f"http://127.0.0.1:{port}/score"
    late = {}

    def start_later():
        time.sleep(0.3)
        server, _ = recording_server()
        server.server_close()
        late["server"] = server = ThreadingHTTPServer(("127.0.0.1", port), server.RequestHandlerClass)
        server.daemon_threads = True
        server.serve_forever(poll_interval=0.02)

    thread = threading.Thread(target=start_later, daemon=True)
    thread.start()
    try:
        reward = get_reward("remote", url=url, retries=4, backoff=0.2)
        with caplog.at_level("INFO", logger="diffalign"):
            assert reward(images(), PROMPTS).tolist() == [0.0, 1.0, 2.0]
    finally:
        thread.join(timeout=0.1)
        if "server" in late:
            late["server"].shutdown()
            late["server"].server_close()
    lines = [r.getMessage() for r in caplog.records if "reward server" in r.getMessage()]
    assert len(lines) == 1, lines
    assert url in lines[0] and "connection refused" in lines[0] and "it answered on try" in lines[0], lines[0]
