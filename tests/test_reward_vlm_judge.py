"""The `vlm_judge` reward against a local server speaking the OpenAI chat-completions protocol (as vLLM and SGLang do):
it reads each image back from its PNG data URL and answers log-probs derived from its pixels, so the score of every
image is known exactly. Every failure (missing key, 401, slow or trickling server, malformed answer) must be one line
within the deadline, and the API key must appear in no message, log line or file."""

import base64
import io
import json
import logging
import math
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from diffalign.rewards import RewardError, available_rewards, call_reward, get_reward
from diffalign.rewards.vlm_judge import build_question, parse_rating, yes_probability
from diffalign.utils import redaction

KEY = "sk-test-0123456789abcdefXYZ"
PROMPTS = ["a red cube", "two cats", "a blue sky"]
LEVELS = [51, 102, 204]  # 8-bit grey levels: P(Yes) = level / 255 = 0.2, 0.4, 0.8


def grey_images(levels=LEVELS, size=8):
    return torch.stack([torch.full((3, size, size), level / 255.0) for level in levels])


@pytest.fixture(autouse=True)
def _forget_secrets():
    yield
    redaction.forget_all()


@contextmanager
def serving(handler_class):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def logprobs_answer(top):
    first = max(top, key=lambda e: e["logprob"])
    return {"id": "chatcmpl-1", "object": "chat.completion", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": first["token"]}, "finish_reason": "length",
        "logprobs": {"content": [{"token": first["token"], "logprob": first["logprob"], "top_logprobs": top}]}}]}


def pixel_answer(request, share=1.0):
    """Yes/No log-probs from the image's first pixel p: P(Yes) = share * p, P(No) = share * (1 - p), the rest of the
    mass (1 - share) on another token; so P(Yes) / (P(Yes) + P(No)) = p exactly."""
    content = request["messages"][0]["content"]
    url = content[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert image.format == "PNG" and image.mode == "RGB"
    p = image.getpixel((0, 0))[0] / 255
    top = [{"token": "Yes", "logprob": math.log(share * p)}, {"token": "No", "logprob": math.log(share * (1 - p))}]
    if share < 1:
        top.append({"token": "Maybe", "logprob": math.log(1 - share)})
    return logprobs_answer(top)


def judge_server(answer=pixel_answer, key=None, delay=0.0, status=200):
    """A chat-completions server: checks the bearer key (401 echoing what it got, as some gateways do), sleeps
    `delay`, then answers `answer(request)`; records the requests and the most requests ever in flight at once."""
    seen = {"requests": [], "in_flight": 0, "most_in_flight": 0, "headers": []}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                seen["requests"].append(request)
                seen["headers"].append(dict(self.headers))
                seen["in_flight"] += 1
                seen["most_in_flight"] = max(seen["most_in_flight"], seen["in_flight"])
            try:
                time.sleep(delay)
                got = self.headers.get("Authorization")
                if key is not None and got != f"Bearer {key}":
                    code, body = 401, {"error": {"message": f"Incorrect API key provided: {got}",
                                                 "type": "invalid_request_error", "code": "invalid_api_key"}}
                else:
                    code, body = status, answer(request)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up
                pass
            finally:
                with lock:
                    seen["in_flight"] -= 1

        def log_message(self, *args):
            pass

    return serving(Handler), seen


def judge(url, **kwargs):
    kwargs.setdefault("api_key_env", None)
    kwargs.setdefault("retries", 0)
    return get_reward("vlm_judge", base_url=url, model="Qwen/Qwen2.5-VL-7B-Instruct", **kwargs)


def one_line_error(reward, x=None, prompts=PROMPTS, metadata=None, within=None):
    start = time.perf_counter()
    with pytest.raises(RewardError) as error:
        call_reward(reward, grey_images() if x is None else x, prompts, metadata, name="vlm_judge")
    elapsed = time.perf_counter() - start
    message = str(error.value)
    assert "\n" not in message, message
    if within is not None:
        assert elapsed < within, (elapsed, message)
    return message, elapsed


# ------------------------------------------------------------------------------------------------ scoring
def test_the_score_is_p_yes_from_the_first_tokens_logprobs(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    server, seen = judge_server(key=KEY)
    with server as url:
        reward = judge(url, api_key_env="JUDGE_KEY", max_concurrency=2)
        scores = call_reward(reward, grey_images(), PROMPTS, name="vlm_judge")
    assert "vlm_judge" in available_rewards()
    torch.testing.assert_close(scores, torch.tensor([0.2, 0.4, 0.8]), rtol=0, atol=1e-6)  # == P(Yes), float32
    questions = sorted(r["messages"][0]["content"][1]["text"] for r in seen["requests"])
    assert questions == sorted(f'Does this image show "{p}"? Answer Yes or No.' for p in PROMPTS)
    request = seen["requests"][0]
    assert request["model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and request["temperature"] == 0.0
    assert request["max_completion_tokens"] == 1 and request["logprobs"] is True and request["top_logprobs"] == 20
    assert all(h["Authorization"] == f"Bearer {KEY}" for h in seen["headers"])


def test_yes_and_no_are_renormalised_over_the_other_tokens():
    server, _ = judge_server(answer=lambda r: pixel_answer(r, share=0.6))
    with server as url:
        scores = judge(url)(grey_images(), PROMPTS)
    torch.testing.assert_close(scores, torch.tensor([0.2, 0.4, 0.8]), rtol=0, atol=1e-6)


def test_yes_probability_follows_flow_factory():
    def lp(**probs):
        return [{"token": t.replace("_", " "), "logprob": math.log(p)} for t, p in probs.items()]

    assert yes_probability(lp(Yes=0.3, No=0.1)) == pytest.approx(0.75, abs=1e-12)
    assert yes_probability(lp(Yes=0.3)) == 1.0 and yes_probability(lp(No=0.3)) == 0.0
    assert yes_probability(lp(The=0.9)) == 0.0  # neither answer among the top tokens: 0, as Flow-Factory
    # exact tokens only, unless canonicalize: " yes" and "YES" add to "Yes"
    variants = lp(Yes=0.2, _yes=0.1, YES=0.1, No=0.1, _no=0.1)
    assert yes_probability(variants) == pytest.approx(2 / 3)
    assert yes_probability(variants, canonicalize=True) == pytest.approx(0.4 / 0.6)


def test_rating_mode_parses_a_number_and_nan_otherwise():
    answers = {"a red cube": "7", "two cats": "Rating: 8.5/10", "a blue sky": "I cannot tell", "x": "42"}

    def rating(request):
        text = request["messages"][0]["content"][1]["text"]
        prompt = text.split('"')[1]
        return {"choices": [{"message": {"role": "assistant", "content": answers[prompt]}}]}

    server, seen = judge_server(answer=rating)
    with server as url:
        scores = judge(url, mode="rating")(grey_images([1, 2, 3, 4]), PROMPTS + ["x"])
    assert scores[:2].tolist() == [7.0, 8.5] and math.isnan(scores[2]) and math.isnan(scores[3])  # 42: off the scale
    request = seen["requests"][0]
    assert "logprobs" not in request and request["max_completion_tokens"] == 8
    assert request["messages"][0]["content"][1]["text"].startswith("On a scale from 1 to 10,")
    assert parse_rating("10", 1, 10) == 10 and math.isnan(parse_rating("", 1, 10))


def test_the_question_is_built_from_the_prompt_and_its_metadata():
    server, seen = judge_server()
    metadata = [{"tag": "counting", "count": 2, "object": "cat"}] * 3
    with server as url:
        reward = judge(url, question="Is there exactly {count} {object}? ({prompt}) Answer Yes or No.")
        reward(grey_images(), PROMPTS, metadata)
        texts = {r["messages"][0]["content"][1]["text"] for r in seen["requests"]}
        assert texts == {f"Is there exactly 2 cat? ({p}) Answer Yes or No." for p in PROMPTS}
        message, _ = one_line_error(judge(url, question="Is there {colour} paint?"), metadata=metadata)
    assert "{colour}" in message and "metadata field" in message
    assert build_question("{prompt}!", "a cat", None) == "a cat!"


def test_requests_run_concurrently_within_the_bound():
    server, seen = judge_server(delay=0.2)
    with server as url:
        start = time.perf_counter()
        scores = judge(url, max_concurrency=2)(grey_images(LEVELS * 2), PROMPTS * 2)
        elapsed = time.perf_counter() - start
    assert seen["most_in_flight"] == 2, seen["most_in_flight"]
    assert 0.55 < elapsed < 1.0, elapsed  # three rounds of two, not six in a row (1.2 s)
    torch.testing.assert_close(scores, torch.tensor([0.2, 0.4, 0.8] * 2), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ failures: one line
def test_a_missing_key_is_one_line_when_the_reward_is_built(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(RewardError) as error:
        get_reward("vlm_judge", base_url="http://127.0.0.1:9/v1", model="m")
    message = str(error.value)
    assert "\n" not in message and "OPENAI_API_KEY" in message and "is not set" in message
    monkeypatch.setenv("OPENAI_API_KEY", "")
    with pytest.raises(RewardError, match=r"OPENAI_API_KEY \(reward_kwargs.api_key_env\) is empty"):
        get_reward("vlm_judge", base_url="http://127.0.0.1:9/v1", model="m")


def test_a_401_is_one_line_without_the_key_even_when_the_server_echoes_it(monkeypatch, caplog):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    server, seen = judge_server(key="the-right-key-000000")
    with server as url, caplog.at_level(logging.INFO, logger="diffalign"):
        message, _ = one_line_error(judge(url, api_key_env="JUDGE_KEY", retries=3, backoff=0.01), within=2)
    assert "HTTP 401" in message and "Incorrect API key provided" in message, message
    assert KEY not in message and "<redacted>" in message, message
    assert len(seen["requests"]) <= 3  # not retried (a 401 is not transient); at most the requests already in flight
    assert all(KEY not in record.getMessage() for record in caplog.records)


def test_a_slow_server_fails_at_the_deadline_after_the_retries():
    server, _ = judge_server(delay=1.5)
    with server as url:
        message, elapsed = one_line_error(judge(url, timeout=0.2, retries=1, backoff=0.05), within=1.4)
    assert elapsed >= 0.4 and "did not answer within 0.2 s after 2 tries" in message, (elapsed, message)


def test_a_trickling_server_fails_at_the_total_deadline():
    class Trickle(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps(logprobs_answer([{"token": "Yes", "logprob": 0.0}])).encode()
            data = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            try:
                for i in range(len(data)):  # one byte every 0.1 s: each read is quick, the answer takes ~30 s
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    with serving(Trickle) as url:
        message, elapsed = one_line_error(judge(url, timeout=0.5), within=1.5)
    assert elapsed >= 0.45 and "did not answer within 0.5 s after 1 try" in message, (elapsed, message)


@pytest.mark.parametrize("answer, expected", [
    ({"choices": [{"message": {"content": "Yes"}}]}, "without choices[0].logprobs.content[0].top_logprobs"),
    ({"choices": []}, "no choices[0]"),
    ({"object": "chat.completion"}, "no choices[0]"),
    (logprobs_answer([{"token": "Yes", "logprob": "high"}]), "a log-prob that is not a number"),
    (logprobs_answer([{"token": "Yes", "logprob": 0.5}]), "a log-prob that is not a number <= 0"),
    ({"error": {"message": "model 'x' does not exist\nat line 2"}}, "an error: model 'x' does not exist at line 2"),
    (b"<html>bad gateway</html>", "answered invalid JSON"),
])
def test_malformed_answers_are_one_line(answer, expected):
    server, _ = judge_server(answer=lambda request: answer)
    with server as url:
        message, _ = one_line_error(judge(url), within=2)
    assert expected in message, message


def test_an_http_error_is_one_line_with_the_servers_message():
    server, _ = judge_server(answer=lambda r: {"error": "The model `m` does not exist."}, status=404)
    with server as url:
        message, _ = one_line_error(judge(url), within=2)
    assert "HTTP 404" in message and "does not exist" in message, message


@pytest.mark.parametrize("kwargs, expected", [
    ({"base_url": "gpu-box:8000/v1"}, "base_url must be http://"),
    ({"mode": "score"}, "mode must be one of yes_no, rating"),
    ({"model": ""}, "model must name the served model"),
    ({"max_concurrency": 0}, "max_concurrency must be an integer >= 1"),
    ({"timeout": 0}, "reward 'vlm_judge': timeout must be > 0"),
    ({"rating_range": (5, 1)}, "rating_range must be two numbers"),
    ({"api_keyy": "x"}, "has no option 'api_keyy'"),
])
def test_bad_settings_are_one_line(kwargs, expected):
    settings = {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": None, **kwargs}
    with pytest.raises(RewardError, match=expected):
        get_reward("vlm_judge", **settings)


def test_a_retried_request_logs_one_line_without_the_key(monkeypatch, caplog):
    """A 503 (an overloaded server) is retried; when the retry passes, one log line says so, with no key in it."""
    monkeypatch.setenv("JUDGE_KEY", KEY)
    calls = {"n": 0}
    lock = threading.Lock()

    def flaky(request):
        with lock:
            calls["n"] += 1
            first = calls["n"] == 1
        return {"error": f"overloaded; your key {KEY}"} if first else pixel_answer(request)

    class Flaky503(BaseHTTPRequestHandler):
        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body = flaky(request)
            data = json.dumps(body).encode()
            self.send_response(503 if "error" in body else 200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    with serving(Flaky503) as url, caplog.at_level(logging.INFO, logger="diffalign"):
        scores = judge(url, api_key_env="JUDGE_KEY", retries=2, backoff=0.05, max_concurrency=1)(
            grey_images(), PROMPTS)
    torch.testing.assert_close(scores, torch.tensor([0.2, 0.4, 0.8]), rtol=0, atol=1e-6)
    lines = [r.getMessage() for r in caplog.records if "answered on try" in r.getMessage()]
    assert len(lines) == 1 and "HTTP 503" in lines[0] and url in lines[0], lines
    assert all(KEY not in record.getMessage() for record in caplog.records)


@pytest.mark.slow
def test_a_training_run_with_the_judge_writes_no_key(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`reward: vlm_judge` from the command line: the run scores through the judge with the key from the environment,
    and no file of the run (binary ones included) nor its output holds the key; a wrong key stops it with one line
    and exit code 2."""
    from diffalign.cli import main

    monkeypatch.setenv("JUDGE_KEY", KEY)
    server, seen = judge_server(key=KEY)
    args = ["train", "ddpo", "--model", tiny_model_dir, "--prompts", "[a cat, a dog]", "--num_epochs", "1",
            "--sample_num_steps", "2", "--sample_num_prompts_per_epoch", "2", "--sample_images_per_prompt", "2",
            "--train_batch_size", "2", "--grid_num_images", "1", "--reward", "vlm_judge"]
    with server as url:
        kwargs = f"{{base_url: {url}, model: judge, api_key_env: JUDGE_KEY, retries: 0, timeout: 10}}"
        code = main(args + ["--output_dir", str(tmp_path / "run"), "--reward_kwargs", kwargs])
        assert code == 0 and len(seen["requests"]) >= 4
        monkeypatch.setenv("JUDGE_KEY", "sk-wrong-key-9876543210")
        code = main(args + ["--output_dir", str(tmp_path / "refused"), "--reward_kwargs", kwargs])
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.startswith("diffalign: error:")]
    assert code == 2 and len(errors) == 1 and "HTTP 401" in errors[0], errors
    for secret in (KEY, "sk-wrong-key-9876543210"):
        assert secret not in out.out + out.err
        for path in tmp_path.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert 0 <= json.loads(f.readline())["reward_mean"] <= 1
