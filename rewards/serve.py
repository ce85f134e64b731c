"""Reference scoring server for the `remote` reward: any diffalign reward behind HTTP (standard library only).

    python -m diffalign.rewards.serve --reward pickscore --port 8000 --reward_kwargs '{device: cuda}'
    # on the training machine:
    diffalign train prdp ... --reward remote --reward_kwargs '{url: http://gpu-box:8000/score}'

`POST /score` (any path) takes `{"images": [base64 PNG], "prompts": [...], "metadata": [...] | null}` and answers
`{"scores": [...]}`, plus `"parts"` when the reward is a mixture; `GET /health` answers `{"status": "ok", "reward":
...}`. Bad requests get HTTP 400 and a failing reward HTTP 500, each with `{"error": "<one line>"}`, which the client
shows. Requests are served by threads (`ThreadingHTTPServer`) while the reward runs one batch at a time (one model,
one device).

There is no authentication: the server listens on 127.0.0.1 unless `--host` says otherwise; expose it only on a
network you trust, or behind a gateway that checks the `headers` the client can send.
"""

import argparse
import base64
import binascii
import io
import json
import logging
import math
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger("diffalign.rewards.serve")

MAX_REQUEST_BYTES = 1 << 30  # 1 GiB: a batch of 64 1024-px PNGs is ~200 MB


class BadRequest(ValueError):
    """A request that does not follow the protocol (HTTP 400)."""


def decode_images(encoded, device="cpu") -> torch.Tensor:
    """Base64 PNG (or any format PIL reads) strings -> float `[B, 3, H, W]` in [0, 1] on `device`."""
    if not isinstance(encoded, list) or not encoded:
        raise BadRequest("'images' must be a non-empty list of base64-encoded PNGs")
    arrays = []
    for i, text in enumerate(encoded):
        try:
            with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as image:
                arrays.append(np.asarray(image.convert("RGB")))
        except (TypeError, ValueError, binascii.Error, OSError) as e:
            raise BadRequest(f"image {i} is not a base64-encoded image ({type(e).__name__})") from None
    if len({a.shape for a in arrays}) > 1:
        raise BadRequest(f"the images of one request must have one size; got {sorted({a.shape[:2] for a in arrays})}")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch.to(device=device, dtype=torch.float32) / 255


def _finite_or_none(values):
    # strict JSON has no NaN/inf; the client reads null as NaN, so any JSON reader can parse the answer
    return [v if math.isfinite(v) else None for v in values]


class RewardServer(ThreadingHTTPServer):
    """A `ThreadingHTTPServer` scoring with `reward_fn(images, prompts, metadata)`, one batch at a time."""

    daemon_threads = True

    def __init__(self, address, reward_fn, name: str = "reward", device="cpu"):
        super().__init__(address, RewardHandler)
        self.reward_fn = reward_fn
        self.reward_label = name
        self.device = device
        self.lock = threading.Lock()

    def score(self, request: dict) -> dict:
        from diffalign.rewards import call_reward

        if not isinstance(request, dict):
            raise BadRequest('expected a JSON object {"images": [...], "prompts": [...], "metadata": [...]}')
        images = decode_images(request.get("images"), self.device)
        prompts = request.get("prompts")
        if not (isinstance(prompts, list) and len(prompts) == len(images)
                and all(isinstance(p, str) for p in prompts)):
            raise BadRequest(f"'prompts' must be a list of {len(images)} strings, one per image")
        metadata = request.get("metadata")
        if metadata is not None and (not isinstance(metadata, list) or len(metadata) != len(images)):
            raise BadRequest(f"'metadata' must be null or a list of {len(images)} entries, one per image")
        with self.lock:
            scores = call_reward(self.reward_fn, images, prompts, metadata, name=self.reward_label)
            parts = {name: torch.as_tensor(values, dtype=torch.float32).reshape(-1).tolist()
                     for name, values in getattr(self.reward_fn, "last_parts", {}).items()}
        answer = {"scores": _finite_or_none(scores.tolist())}
        if parts:
            answer["parts"] = {name: _finite_or_none(values) for name, values in parts.items()}
        return answer


class RewardHandler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self._send(200, {"status": "ok", "reward": self.server.reward_label})

    def do_POST(self):
        from diffalign.errors import UserError, first_line

        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._send(411, {"error": "a Content-Length header is required"})
        if length > MAX_REQUEST_BYTES:
            return self._send(413, {"error": f"request of {length} bytes is over the limit of {MAX_REQUEST_BYTES}"})
        try:
            request = json.loads(self.rfile.read(length))
        except ValueError as e:
            return self._send(400, {"error": f"the request is not valid JSON ({first_line(e)})"})
        try:
            answer = self.server.score(request)
        except BadRequest as e:
            return self._send(400, {"error": str(e)})
        except UserError as e:  # the reward's own one-line error (RewardError: wrong output, failure)
            logger.warning("reward error: %s", e)
            return self._send(500, {"error": str(e)})
        except Exception as e:
            logger.exception("reward %s failed", self.server.reward_label)
            return self._send(500, {"error": f"reward '{self.server.reward_label}' failed: {first_line(e)}"})
        self._send(200, answer)

    def _send(self, status: int, payload: dict):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        logger.debug("%s - %s", self.address_string(), format % args)


def make_server(reward, host: str = "127.0.0.1", port: int = 8000, device: Optional[str] = None,
                **reward_kwargs) -> RewardServer:
    """A `RewardServer` for `reward` (a name, `module:function`, mixture, or a callable); `port=0` picks a free port
    (`server.server_address[1]`). Call `serve_forever()` (in a thread, for tests) and `shutdown()`."""
    from diffalign.rewards import get_reward, reward_name

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    reward_fn = reward if callable(reward) else get_reward(reward, **reward_kwargs)
    return RewardServer((host, port), reward_fn, name=reward_name(reward_fn, None if callable(reward) else reward),
                        device=device)


def main(argv=None) -> int:
    import yaml

    from diffalign.errors import UserError

    parser = argparse.ArgumentParser(prog="python -m diffalign.rewards.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--reward", required=True,
                        help="reward name, module:function or a YAML {name: weight} mixture")
    parser.add_argument("--reward_kwargs", "--reward-kwargs", default="{}",
                        help="YAML mapping of the reward's options")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None, help="device of the images (default cuda when available)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    try:
        spec = yaml.safe_load(args.reward)
        kwargs = yaml.safe_load(args.reward_kwargs) or {}
        if not isinstance(kwargs, dict):
            raise UserError(f"--reward_kwargs must be a YAML mapping; got {args.reward_kwargs!r}")
        server = make_server(spec if isinstance(spec, dict) else args.reward, args.host, args.port, args.device,
                             **kwargs)
    except (UserError, yaml.YAMLError, OSError) as e:
        print(f"diffalign.rewards.serve: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    logger.info("serving reward %s on http://%s:%d/score (device %s)", server.reward_label, host, port, server.device)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
