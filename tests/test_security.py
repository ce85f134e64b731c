"""Secrets and local paths never leave the machine (issue #35): a token in `reward_kwargs.headers`, a key named like a
credential and the values marked secret by hand (`{"secret": ...}`, `"env:NAME"`) reach the reward at run time and
appear in no file of the run (binary ones included: TensorBoard events, safetensors, checkpoints), in no log line
and in no error message; the shared outputs (`final/`) and the lock file carry no home path."""

import base64
import io
import json
import os
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy
import pytest
from PIL import Image

from diffalign.cli import main
from diffalign.rewards import register_reward
from diffalign.rewards.remote import RemoteReward
from diffalign.utils import redaction
from diffalign.utils.redaction import MARKER, is_secret_key, redact, redact_argv, reveal, scrub, shareable_path

HEADER_TOKEN = "hdr-tok-7f3a9c1e5b2d"  # Authorization of the training reward, on the command line
API_TOKEN = "api-tok-4e8d2b6a0c1f"  # a kwarg named api_token
ENV_TOKEN = "env-tok-9b1d3f5a7c2e"  # read from the environment ("env:DIFFALIGN_TEST_AUTH")
MARKED = "marked-tok-2c4e6a8b0d1f"  # marked by hand ({"secret": ...})
TOKENS = (HEADER_TOKEN, API_TOKEN, ENV_TOKEN, MARKED)

RUN_ARGS = ["--model", "digits", "--prompt_fn", "digits", "--num_epochs", "2", "--sample_num_steps", "3",
            "--sample_num_prompts_per_epoch", "2", "--sample_images_per_prompt", "2", "--train_num_inner_epochs", "1",
            "--grid_num_images", "2", "--final_eval_num_images", "2", "--log_images_every", "1", "--checkpoint_every",
            "1"]


def scoring_server(expected_authorization, status=200):
    """Scores each image by its mean brightness; answers 401 to a request without `expected_authorization` (and
    `status` with an error that quotes the header it got, as careless gateways do, when `status` is not 200)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            got = self.headers.get("Authorization")
            if got != expected_authorization or status != 200:
                answer, code = {"error": f"bad credentials: {got}"}, (status if status != 200 else 401)
            else:
                scores = [float(numpy.asarray(Image.open(io.BytesIO(base64.b64decode(b)))).mean()) / 255
                          for b in body["images"]]
                answer, code = {"scores": scores}, 200
            data = json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    return server


@contextmanager
def serving(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/score"
    finally:
        server.shutdown()
        server.server_close()


RECEIVED = []  # the api_token values the reward was built with: the real ones must reach it


@register_reward("test_gateway_reward")
def gateway_reward(url, headers, api_token, timeout=10.0):
    """A remote reward behind a gateway that also needs an API key of its own (a user's reward, as a plugin)."""
    RECEIVED.append(api_token)
    return RemoteReward(url, headers=headers, timeout=timeout, retries=0)


def all_files(directory):
    for root, _, names in os.walk(directory):
        for name in names:
            yield os.path.join(root, name)


@pytest.fixture(scope="module")
def servers():
    """The training reward's and the held-out scorer's servers, each checking its own token."""
    with serving(scoring_server(f"Bearer {HEADER_TOKEN}")) as url, \
            serving(scoring_server(f"Bearer {ENV_TOKEN}")) as eval_url:
        yield url, eval_url


def secret_args(out, url, eval_url):
    """The training command: the header token on the command line, the held-out one from the environment."""
    reward_kwargs = {"url": url, "headers": {"Authorization": f"Bearer {HEADER_TOKEN}"}, "api_token": API_TOKEN}
    eval_kwargs = {"url": eval_url, "headers": {"Authorization": "env:DIFFALIGN_TEST_AUTH"},
                   "api_token": {"secret": MARKED}}
    return (["train", "prdp", "--output_dir", out, "--reward", "test_gateway_reward", "--reward_kwargs",
             json.dumps(reward_kwargs), "--eval_reward", "test_gateway_reward", "--eval_reward_kwargs",
             json.dumps(eval_kwargs), "--report_to", "tensorboard"] + RUN_ARGS)


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory, servers):
    """A digits run (TensorBoard, checkpoints, final evaluation, model card) whose reward and held-out scorer sit
    behind token-checking servers; the tokens come from the command line, a kwarg and the environment."""
    out = str(tmp_path_factory.mktemp("secrets") / "run")
    patch = pytest.MonkeyPatch()
    err = io.StringIO()
    import sys

    patch.setattr(sys, "stderr", err)
    RECEIVED.clear()
    patch.setenv("DIFFALIGN_TEST_AUTH", f"Bearer {ENV_TOKEN}")
    argv = secret_args(out, *servers)
    patch.setattr(sys, "argv", ["diffalign"] + argv)  # what the lock file records
    try:
        code = main(argv)
    finally:
        patch.undo()
        redaction.forget_all()
    return out, code, err.getvalue()


def test_the_real_secrets_reach_the_reward(secret_run):
    out, code, err = secret_run
    assert code == 0, err
    assert API_TOKEN in RECEIVED and MARKED in RECEIVED  # and the servers accepted both Authorization headers
    with open(os.path.join(out, "metrics.jsonl")) as f:
        record = json.loads(f.readline())
    assert 0 <= record["reward_mean"] <= 1 and 0 <= record["eval_mean"] <= 1, record


def test_no_output_file_holds_a_secret(secret_run):
    out, _, err = secret_run
    files = list(all_files(out))
    kinds = {os.path.basename(os.path.dirname(p)) for p in files} | {os.path.splitext(p)[1] for p in files}
    for expected in (".safetensors", ".json", ".jsonl", ".md", ".png", ".lock", "final"):
        assert expected in kinds, (expected, sorted(kinds))
    assert any("tfevents" in p for p in files), files  # TensorBoard's event file, with the hparams
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        for token in TOKENS:
            assert token.encode() not in data, (token, path)
    for token in TOKENS:
        assert token not in err, token
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["reward_kwargs"]["headers"] == {"Authorization": MARKER}
    assert config["reward_kwargs"]["api_token"] == MARKER
    assert config["eval_reward_kwargs"]["headers"] == {"Authorization": "env:DIFFALIGN_TEST_AUTH"}
    assert config["eval_reward_kwargs"]["api_token"] == MARKER  # the key names a credential: hidden whole
    with open(os.path.join(out, ".diffalign.lock")) as f:
        assert f.read() == ""  # a finished run releases its lock (the walk above covered it either way)


def test_the_lock_file_hides_a_token_on_the_command_line(tmp_path, monkeypatch):
    """While a run holds its directory, the lock names its command line with the secrets redacted."""
    from diffalign.runlog import acquire_run_lock, release_run_lock

    token = "Bearer lock-secret-4242"
    monkeypatch.setattr(sys, "argv", ["diffalign", "train", "prdp", "--reward_kwargs",
                                      '{"headers": {"Authorization": "%s"}}' % token])
    lock = acquire_run_lock(str(tmp_path))
    try:
        with open(tmp_path / ".diffalign.lock") as f:
            text = f.read()
        assert MARKER in json.loads(text)["command"] and token not in text
    finally:
        release_run_lock(lock)


def test_a_run_with_its_secrets_resumes(secret_run, servers, tmp_path, monkeypatch):
    """The resume check hashes the real settings: the same secrets resume (three epochs, the last one new)."""
    out, code, _ = secret_run
    assert code == 0
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(out, run)
    monkeypatch.setenv("DIFFALIGN_TEST_AUTH", f"Bearer {ENV_TOKEN}")
    args = secret_args(run, *servers) + ["--resume", run]
    args[args.index("--num_epochs") + 1] = "3"
    try:
        assert main(args) == 0
    finally:
        redaction.forget_all()
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1, 2]


def test_an_error_message_never_quotes_a_secret(tmp_path, capsys):
    """A gateway that echoes the header it refused: the command line's one error line hides the token."""
    with serving(scoring_server("nobody", status=403)) as url:
        code = main(["train", "prdp", "--output_dir", str(tmp_path / "run"), "--reward", "remote", "--reward_kwargs",
                     json.dumps({"url": url, "headers": {"Authorization": f"Bearer {HEADER_TOKEN}"}, "retries": 0})]
                    + RUN_ARGS)
    redaction.forget_all()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("diffalign: error:")]
    assert code == 2 and len(lines) == 1 and "HTTP 403" in lines[0] and MARKER in lines[0], err
    assert HEADER_TOKEN not in err


def test_shared_outputs_hold_no_home_path(tmp_path, monkeypatch, tiny_model_dir):
    """A model and a run in the user's home: the card, its snippets and the config copy in `final/` name them
    relative to the run (and the snippets still run from there); the lock file says `~`."""
    import shutil

    home = tmp_path / "home" / "alice"
    models = home / "models"
    models.mkdir(parents=True)
    model = str(models / "tiny-sd")
    shutil.copytree(tiny_model_dir, model)
    monkeypatch.setenv("HOME", str(home))
    out = str(home / "runs" / "sd-ddpo")
    monkeypatch.setattr("sys.argv", ["diffalign", "train", "ddpo", "--model", model, "--output_dir", out])
    assert main(["train", "ddpo", "--model", model, "--output_dir", out, "--prompts", "[a cat, a dog]",
                 "--num_epochs", "1", "--sample_num_steps", "2", "--sample_num_prompts_per_epoch", "2",
                 "--sample_images_per_prompt", "2", "--train_batch_size", "2", "--grid_num_images", "1"]) == 0
    for name in ("final/README.md", "final/diffalign_config.json", ".diffalign.lock"):
        with open(os.path.join(out, name), encoding="utf-8") as f:
            text = f.read()
        assert str(home) not in text and "alice" not in text, (name, text)
    with open(os.path.join(out, "final", "diffalign_config.json")) as f:
        copy = json.load(f)
    assert copy["model"] == os.path.join("..", "..", "models", "tiny-sd") and copy["output_dir"] == "."
    with open(os.path.join(out, "final", "README.md")) as f:
        card = f.read()
    assert '"../../models/tiny-sd"' in card and 'load_lora_weights("final")' in card


# ------------------------------------------------------------------------------ the rules, one by one
@pytest.mark.parametrize("key, secret", [
    ("api_token", True), ("hf_token", True), ("X-Api-Key", True), ("authToken", True), ("DB_PASSWORD", True),
    ("Authorization", True), ("client_secret", True), ("aws_access_key_id", True), ("cookie", True),
    ("max_tokens", False), ("tokenizer", False), ("author", False), ("url", False), ("timeout", False),
    ("api_key_env", False), ("token_file", False), ("HF_TOKEN_PATH", False),
])
def test_secret_key_names(key, secret):
    assert is_secret_key(key) is secret


def test_redact_is_pure_and_covers_every_rule():
    config = {"reward_kwargs": {"url": "https://me:pa55word@gw.example/score?api_key=k123&x=1",
                                "headers": {"X-Custom": "anything"}, "judge": {"nested": [{"Password": "p"}]},
                                "key": {"secret": "lit"}, "from_env": "env:NAME", "auth": False, "max_tokens": 64}}
    before = json.dumps(config)
    assert redact(config) == {"reward_kwargs": {
        "url": f"https://me:{MARKER}@gw.example/score?api_key={MARKER}&x=1", "headers": {"X-Custom": MARKER},
        "judge": {"nested": [{"Password": MARKER}]}, "key": {"secret": MARKER}, "from_env": "env:NAME",
        "auth": False, "max_tokens": 64}}
    assert json.dumps(config) == before


def test_reveal_resolves_marked_values_and_scrubs_them_from_text(monkeypatch):
    monkeypatch.setenv("MY_TOKEN", "s3cr3t-from-env")
    try:
        kwargs = {"headers": {"Authorization": "Bearer tok-abcdef123456"}, "key": {"secret": "lit-value"},
                  "other": "env:MY_TOKEN", "n": 3}
        assert reveal(kwargs) == {"headers": {"Authorization": "Bearer tok-abcdef123456"}, "key": "lit-value",
                                  "other": "s3cr3t-from-env", "n": 3}
        assert scrub("got tok-abcdef123456, lit-value and s3cr3t-from-env") == f"got {MARKER}, {MARKER} and {MARKER}"
        with pytest.raises(redaction.SecretError, match="reward_kwargs.x: the environment variable 'UNSET_VAR'"):
            reveal({"x": "env:UNSET_VAR"})
    finally:
        redaction.forget_all()


def test_command_lines_and_paths(monkeypatch):
    monkeypatch.setenv("HOME", "/home/alice")
    argv = ["diffalign", "train", "--reward_kwargs", '{headers: {Authorization: "Bearer abc"}}', "--hub_token", "xyz",
            "--eval_reward_kwargs={api_key: k}", "--output_dir", "/home/alice/runs/a"]
    assert redact_argv(argv) == ["diffalign", "train", "--reward_kwargs", '{"headers":{"Authorization":"<redacted>"}}',
                                 "--hub_token", MARKER, '--eval_reward_kwargs={"api_key":"<redacted>"}',
                                 "--output_dir", "~/runs/a"]
    assert shareable_path("/home/alice/models/m", "/home/alice/runs/a") == "../../models/m"
    assert shareable_path("/home/alice/models/m", "/tmp/run") == "m"  # would climb through the home directory
    assert shareable_path("/data/models/m", "/data/runs/a") == "../../models/m"
