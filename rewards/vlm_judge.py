"""A vision-language model as judge, over an OpenAI-compatible chat-completions API (vLLM, SGLang, a hosted API).

Each image goes to the judge as a PNG data URL with a question built from its prompt (and its metadata), one request
per image, at most `max_concurrency` at a time. Two modes:

- `yes_no` (default): the judge answers one token, and the score is

      P("Yes") / (P("Yes") + P("No")) = sigmoid(logprob("Yes") - logprob("No"))

  read from the first generated token's `top_logprobs`: Flow-Factory's `vllm_evaluate` convention
  (`src/flow_factory/rewards/vllm_evaluate.py`, `_get_yes_cond_prob`: temperature 0, one completion token,
  `top_logprobs=20`, exact tokens "Yes"/"No" unless `canonicalize`, 0 when neither is among the top tokens). It is a
  smooth score in [0, 1] even for a judge that always answers "Yes".
- `rating`: the judge answers a number (`rating_range`, 1 to 10 by default) and the score is that number, parsed from
  its text; an answer with no number in the range is NaN (the trainer's `nonfinite_policy` handles it).

The HTTP client is the `remote` reward's (`remote.RemoteReward`): a total deadline per try (a slow or trickling server
fails like a silent one), same-origin redirects only, retries of refused or dropped connections, timeouts and
429/502/503/504 with backoff, one log line when a retried request passes. The API key is read from the environment
variable `api_key_env` when the reward is built; it is sent as `Authorization: Bearer ...` to `base_url`'s origin
only, and remembered by `diffalign.utils.redaction`, which removes it from every log line and error message. It is
never a setting, so no config file can hold it.
"""

import concurrent.futures
import json
import logging
import math
import os
import re
from typing import List, Optional, Sequence

import torch

from ..utils.redaction import install_log_filter, remember, scrub
from . import RewardError, register_reward
from .remote import RemoteReward, encode_images

logger = logging.getLogger("diffalign")

MODES = ("yes_no", "rating")
YES_NO_QUESTION = 'Does this image show "{prompt}"? Answer Yes or No.'
RATING_QUESTION = ('On a scale from {low} to {high}, how well does this image show "{{prompt}}"? '
                   'Answer with one number only.')
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


# ------------------------------------------------------------------------------------------------ scoring (pure)
def yes_probability(top_logprobs: Sequence[dict], canonicalize: bool = False) -> float:
    """`P(Yes) / (P(Yes) + P(No))` from the first generated token's `top_logprobs` (`[{"token", "logprob"}, ...]`).

    Without `canonicalize`, only the exact tokens `"Yes"` and `"No"` count and the score is
    `sigmoid(logprob(Yes) - logprob(No))` (in float64); with it, every token that is "yes" or "no" once stripped and
    lower-cased (" Yes", "YES", "yes") adds its probability to its side. When neither side is among the top tokens
    the judge did not answer the question: 0, as in Flow-Factory.
    """
    if not canonicalize:
        logprobs = {entry["token"]: float(entry["logprob"]) for entry in top_logprobs}
        yes, no = logprobs.get("Yes", -math.inf), logprobs.get("No", -math.inf)
        if yes == -math.inf and no == -math.inf:
            return 0.0
        return float(torch.sigmoid(torch.tensor(yes - no, dtype=torch.float64)))
    sides = {"yes": 0.0, "no": 0.0}
    for entry in top_logprobs:
        word = str(entry["token"]).strip().lower()
        if word in sides:
            sides[word] += math.exp(float(entry["logprob"]))
    total = sides["yes"] + sides["no"]
    return sides["yes"] / total if total > 0 else 0.0


def parse_rating(text: str, low: float, high: float) -> float:
    """The first number in `text` if it lies in `[low, high]`, else NaN (no number, or one out of range)."""
    match = _NUMBER.search(text or "")
    if match is None:
        return math.nan
    value = float(match.group())
    return value if low <= value <= high else math.nan


class _Fields(dict):
    def __missing__(self, key):
        raise KeyError(key)


def build_question(template: str, prompt: str, metadata: Optional[dict]) -> str:
    """`template` with `{prompt}` and any `{field}` of the image's metadata filled in (`str.format` syntax)."""
    fields = _Fields({**(metadata or {}), "prompt": prompt})
    try:
        return template.format_map(fields)
    except KeyError as e:
        raise RewardError(f"reward 'vlm_judge': the question template names {{{e.args[0]}}}, which is neither "
                          f"'prompt' nor a metadata field of this image (fields: {sorted(fields)})") from None
    except (ValueError, IndexError, AttributeError) as e:
        raise RewardError(f"reward 'vlm_judge': the question template {template!r} is not a valid format string "
                          f"({e})") from None


# ---------------------------------------------------------------------------------------------------- the reward
class _JudgeClient(RemoteReward):
    unreachable_hint = ("start the judge (see docs/rewards.md, vlm_judge: vllm serve ...) or fix "
                        "reward_kwargs.base_url")


def _malformed(url: str, index: int, what: str) -> RewardError:
    return RewardError(f"judge server {url} answered image {index} {what}")


class VLMJudge:
    """Scores images by asking a VLM served behind an OpenAI-compatible API (see the module docstring).

    Args:
        base_url (`str`): the API's base, e.g. `http://gpu-box:8000/v1` (requests go to `<base_url>/chat/completions`).
        model (`str`): the served model's name, e.g. `Qwen/Qwen2.5-VL-7B-Instruct`.
        mode (`str`, defaults to `"yes_no"`): `"yes_no"` (P(Yes) from log-probs) or `"rating"` (a parsed number).
        question (`str`, *optional*): the question, a `str.format` template of `{prompt}` and the image's metadata
            fields (e.g. `'Is there exactly {count} {object} in this image? Answer Yes or No.'`).
        api_key_env (`str` or `None`, defaults to `"OPENAI_API_KEY"`): the environment variable holding the API key;
            `None` for a server without authentication (a local `vllm serve` without `--api-key`).
        timeout (`float`, defaults to 60): total seconds of one try of one request.
        retries (`int`, defaults to 2), backoff (`float`, defaults to 1): as for the `remote` reward.
        max_concurrency (`int`, defaults to 8): requests in flight at once.
        top_logprobs (`int`, defaults to 20): log-probs asked for the first token (`yes_no`).
        canonicalize (`bool`, defaults to False): count " Yes", "yes", "YES" as "Yes" (and so for "No").
        rating_range (`(low, high)`, defaults to (1, 10)): the scale of `rating` mode.
        max_tokens (`int`, *optional*): completion tokens; 1 for `yes_no`, 8 for `rating` by default.
    """

    def __init__(self, base_url: str, model: str, mode: str = "yes_no", question: Optional[str] = None,
                 api_key_env: Optional[str] = "OPENAI_API_KEY", timeout: float = 60.0, retries: int = 2,
                 backoff: float = 1.0, max_concurrency: int = 8, top_logprobs: int = 20, canonicalize: bool = False,
                 rating_range: Sequence[float] = (1, 10), max_tokens: Optional[int] = None):
        if mode not in MODES:
            raise RewardError(f"reward 'vlm_judge': mode must be one of {', '.join(MODES)}; got {mode!r}")
        if not isinstance(model, str) or not model.strip():
            raise RewardError("reward 'vlm_judge': model must name the served model, e.g. "
                              "Qwen/Qwen2.5-VL-7B-Instruct (GET <base_url>/models lists them)")
        base = str(base_url).rstrip("/")
        url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        if not re.match(r"^https?://[^/\s]+", base):
            raise RewardError(f"reward 'vlm_judge': base_url must be http://host:port/v1 or https://...; "
                              f"got {base_url!r}")
        for name, value in (("max_concurrency", max_concurrency), ("top_logprobs", top_logprobs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RewardError(f"reward 'vlm_judge': {name} must be an integer >= 1; got {value!r}")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise RewardError(f"reward 'vlm_judge': max_tokens must be an integer >= 1; got {max_tokens!r}")
        try:
            low, high = (float(v) for v in rating_range)
        except (TypeError, ValueError):
            low = high = math.nan
        if not low < high:
            raise RewardError(f"reward 'vlm_judge': rating_range must be two numbers (low, high) with low < high; "
                              f"got {rating_range!r}")
        headers = {}
        if api_key_env is not None:
            key = os.environ.get(str(api_key_env), "")
            if not key:
                state = "is empty" if str(api_key_env) in os.environ else "is not set"
                raise RewardError(f"reward 'vlm_judge': the API key's environment variable {api_key_env} "
                                  f"(reward_kwargs.api_key_env) {state}; export it, or set api_key_env: null "
                                  f"for a server without authentication")
            remember([key])  # from here on scrubbed from every log line and error message
            install_log_filter(logger)
            headers["Authorization"] = f"Bearer {key}"
        # batch_size does not apply: one request per image
        try:
            self.client = _JudgeClient(url, timeout=timeout, retries=retries, backoff=backoff, headers=headers)
        except RewardError as e:  # the shared client's checks of timeout, retries, backoff
            raise RewardError(str(e).replace("reward 'remote'", "reward 'vlm_judge'")) from None
        self.url = url
        self.model = model
        self.mode = mode
        self.rating_range = (low, high)
        self.question = question if question is not None else (
            YES_NO_QUESTION if mode == "yes_no" else RATING_QUESTION.format(low=f"{low:g}", high=f"{high:g}"))
        self.max_concurrency = max_concurrency
        self.top_logprobs = top_logprobs
        self.canonicalize = bool(canonicalize)
        self.max_tokens = max_tokens or (1 if mode == "yes_no" else 8)

    def request(self, image_png_base64: str, question: str) -> dict:
        """The chat-completions request for one image (the image first, then the question, as Flow-Factory)."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_png_base64}},
                {"type": "text", "text": question},
            ]}],
            "temperature": 0.0,
            "max_completion_tokens": self.max_tokens,
        }
        if self.mode == "yes_no":
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        return body

    def score_answer(self, answer, index: int = 0) -> float:
        """The score of one decoded chat-completions answer; a `RewardError` (one line) when it is malformed."""
        if isinstance(answer, dict) and "error" in answer:
            error = answer["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise _malformed(self.url, index, f"an error: {' '.join(str(message).split())[:200]}")
        try:
            choice = answer["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise _malformed(self.url, index, "no choices[0]; expected an OpenAI chat-completions answer") from None
        if self.mode == "rating":
            content = (choice.get("message") or {}).get("content") if isinstance(choice, dict) else None
            if not isinstance(content, str):
                raise _malformed(self.url, index, "no choices[0].message.content text")
            return parse_rating(content, *self.rating_range)
        try:
            top = choice["logprobs"]["content"][0]["top_logprobs"]
            entries = [{"token": str(e["token"]), "logprob": e["logprob"]} for e in top]
        except (KeyError, IndexError, TypeError):
            raise _malformed(self.url, index, "without choices[0].logprobs.content[0].top_logprobs; serve the judge "
                                              "with vLLM or SGLang (they return log-probs) or use mode: rating"
                             ) from None
        for entry in entries:
            value = entry["logprob"]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value > 0 or math.isnan(value):
                raise _malformed(self.url, index, f"a log-prob that is not a number <= 0 ({value!r:.40} for token "
                                                  f"{entry['token']!r:.20})")
        return yes_probability(entries, self.canonicalize)

    def _score_one(self, index: int, image_png_base64: str, question: str) -> float:
        body = json.dumps(self.request(image_png_base64, question)).encode()
        return self.score_answer(self.client._post(body), index)

    def __call__(self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[dict]] = None
                 ) -> torch.Tensor:
        if len(prompts) != len(images) or (metadata is not None and len(metadata) != len(images)):
            raise RewardError(f"reward 'vlm_judge': {len(images)} images, {len(prompts)} prompts and "
                              f"{'no' if metadata is None else len(metadata)} metadata entries; they must match")
        questions = [build_question(self.question, prompt, None if metadata is None else metadata[i])
                     for i, prompt in enumerate(prompts)]
        encoded = encode_images(images)
        scores = [math.nan] * len(images)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(images))),
                                                     thread_name_prefix="vlm_judge")
        try:
            futures = {pool.submit(self._score_one, i, encoded[i], questions[i]): i for i in range(len(images))}
            for future in concurrent.futures.as_completed(futures):
                scores[futures[future]] = future.result()
        except RewardError as e:
            # the first failure ends the call at once (queued requests are cancelled; those in flight end by their
            # own deadline); the key never reaches the message, even when a server echoes it
            raise RewardError(scrub(str(e))) from None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return torch.tensor(scores, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"VLMJudge({self.url!r}, model={self.model!r}, mode={self.mode!r})"


@register_reward("vlm_judge")
def vlm_judge(base_url: str, model: str, mode: str = "yes_no", question: Optional[str] = None,
              api_key_env: Optional[str] = "OPENAI_API_KEY", timeout: float = 60.0, retries: int = 2,
              backoff: float = 1.0, max_concurrency: int = 8, top_logprobs: int = 20, canonicalize: bool = False,
              rating_range: Sequence[float] = (1, 10), max_tokens: Optional[int] = None) -> VLMJudge:
    """A VLM judge over an OpenAI-compatible API (see `VLMJudge` and the module docstring)."""
    return VLMJudge(base_url, model, mode=mode, question=question, api_key_env=api_key_env, timeout=timeout,
                    retries=retries, backoff=backoff, max_concurrency=max_concurrency, top_logprobs=top_logprobs,
                    canonicalize=canonicalize, rating_range=rating_range, max_tokens=max_tokens)
