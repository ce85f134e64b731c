"""Scoring an epoch's samples while they are sampled: the trainers' one path to the reward.

`RewardScorer.epoch()` opens an `EpochScoring`; the sampler hands it each chunk of `sample_batch_size` samples as soon
as the chunk is decoded (`EpochScoring.add`), and `EpochScoring.finish` returns the scores of the whole batch. With
`asynchronous=True` (the trainers' `reward_async`, on by default) the reward runs in a background thread, so the reward
of one chunk is computed while the next chunk is sampled (torch releases the GIL in its ops, an HTTP client while it
waits); with `False` the same calls run in the sampling thread. Both call the reward with the same samples in the same
order (one call per chunk, whole prompt groups for a groupwise reward), so both give the same scores, bit for bit.

Groupwise rewards (`diffalign.rewards.is_groupwise`) are called only with whole groups: the samples of a chunk whose
group goes on in the next chunk wait for it. The groups of an epoch are the process's own (each process samples whole
prompt slots), which `finish` checks against the expected group size.

A reward that allows it (`concurrent_calls = N`, e.g. the `remote` reward) gets up to N calls in flight at once, so a
server's latency is paid once rather than once per chunk. A failure of the reward is raised as it is (the one-line
`RewardError` of `call_reward`), by the next `add` or by `finish`; the calls not yet started are then cancelled.

Videos (`[B, F, 3, H, W]`) are scored like images, one score per video: an image reward frame by frame, its frame
scores reduced by `video_reduction` (the trainers' `video_reward_reduction`), a video-native reward on the whole videos
(`diffalign.rewards.call_reward`).
"""

import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Optional

import torch

from . import RewardError, call_reward, check_video_reduction, is_groupwise


def with_group_ids(metadata: Optional[List[dict]], group_ids: torch.Tensor) -> List[dict]:
    """Each sample's metadata row (a prompt file's fields; `{}` when None) with the sample's `group_id` added."""
    rows = metadata if metadata is not None else [{}] * len(group_ids)
    return [{**row, "group_id": int(g)} for row, g in zip(rows, group_ids.tolist())]


def concurrent_calls(fn) -> int:
    """How many calls of `fn` may run at once from different threads (`fn.concurrent_calls`, default 1)."""
    value = getattr(fn, "concurrent_calls", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1


def contiguous_groups_end(group_ids: List[int], group_size: Optional[int] = None) -> int:
    """The number of leading samples that form whole groups, given that the samples after them may continue the last
    group: the start of the last run of equal ids (0 when all share one id), or all of them when that run already
    holds `group_size` samples."""
    end = len(group_ids)
    while end > 0 and group_ids[end - 1] == group_ids[-1]:
        end -= 1
    return len(group_ids) if group_size is not None and len(group_ids) - end == group_size else end


class RewardScorer:
    """The reward (and the optional eval reward) of a trainer, and how they are called.

    Args:
        reward_fn: the reward, `(images, prompts, metadata[, group_ids]) -> Tensor[B]`.
        reward_label (`str`): its name in messages.
        eval_reward_fn (*optional*), eval_label (`str`): a second scorer, logged and never trained on.
        asynchronous (`bool`): score in a background thread while the next chunk is sampled.
        video_reduction (`str`): how an image reward's frame scores make a video's score (`mean`, `min`, `max`,
            `median`: `diffalign.rewards.VIDEO_REDUCTIONS`); images ignore it.
    """

    def __init__(self, reward_fn, reward_label: str, eval_reward_fn=None, eval_label: str = "eval_reward",
                 asynchronous: bool = True, video_reduction: str = "mean"):
        self.reward_fn, self.reward_label = reward_fn, reward_label
        self.eval_reward_fn, self.eval_label = eval_reward_fn, eval_label
        self.asynchronous = asynchronous
        self.video_reduction = check_video_reduction(video_reduction)
        self.groupwise = is_groupwise(reward_fn) or is_groupwise(eval_reward_fn)
        fns = [fn for fn in (reward_fn, eval_reward_fn) if fn is not None]
        self.workers = min(concurrent_calls(fn) for fn in fns)
        self._executor: Optional[ThreadPoolExecutor] = None

    def score(self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[dict]],
              group_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        """`{"reward": [B], "reward_<part>": [B] (a mixture's or a groupwise reward's parts), "eval": [B]}` of one
        batch, float32 on the CPU, in one call of each reward. Each sample's metadata (`{}` when None) gets its
        `group_id`."""
        metadata = with_group_ids(metadata, group_ids)
        with torch.no_grad():
            rewards = call_reward(self.reward_fn, images, prompts, metadata, name=self.reward_label,
                                  group_ids=group_ids, video_reduction=self.video_reduction)
            scores = {"reward": rewards}
            # read in the thread that made the call: a reward that allows concurrent calls keeps them per thread
            for name, part in getattr(self.reward_fn, "last_parts", {}).items():
                scores[f"reward_{name}"] = torch.as_tensor(part, dtype=torch.float32).reshape(-1).cpu()
            if self.eval_reward_fn is not None:
                scores["eval"] = call_reward(self.eval_reward_fn, images, prompts, metadata, name=self.eval_label,
                                             group_ids=group_ids, video_reduction=self.video_reduction)
        return scores

    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="diffalign-reward")
            weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)
        return self._executor

    def epoch(self, metadata: Optional[List[dict]], group_size: Optional[int] = None) -> "EpochScoring":
        """The scoring of one epoch's local samples; `metadata` holds one dict per sample (in sampling order) and
        `group_size` is the number of samples of each group (checked for a groupwise reward)."""
        return EpochScoring(self, metadata, group_size)


class EpochScoring:
    """One epoch's scoring, fed chunk by chunk (`add`) and closed by `finish`; a context manager that cancels the
    calls not yet started when sampling fails."""

    def __init__(self, scorer: RewardScorer, metadata: Optional[List[dict]], group_size: Optional[int] = None):
        self.scorer = scorer
        self.metadata = metadata
        self.group_size = group_size
        self.pending: List = []  # chunks (images, prompts, group ids) not yet handed to the reward
        self.jobs: List[Future] = []
        self.submitted = 0  # samples handed to the reward
        self.received = 0  # samples received from the sampler
        self.done_groups = set()
        self.blocked_seconds = 0.0  # time the sampling thread spent scoring or waiting for scores
        self.call_seconds = 0.0  # time the reward calls took (in whichever thread)
        self._lock = threading.Lock()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            for job in self.jobs:
                job.cancel()
        return False

    # ------------------------------------------------------------------ feeding
    def add(self, chunk):
        """A sampled chunk (`Trajectories` with `images`, `prompts`, `group_ids`): its whole groups (all of it for a
        pointwise reward) go to the reward; raises the reward's error of an earlier chunk, if any."""
        start = time.perf_counter()
        try:
            self.pending.append((chunk.images, list(chunk.prompts), chunk.group_ids.reshape(-1).cpu()))
            self.received += len(chunk.prompts)
            self._raise_failures()
            self._submit(final=False)
        finally:
            self.blocked_seconds += time.perf_counter() - start

    def finish(self, trajectories) -> Dict[str, torch.Tensor]:
        """The scores of the epoch's samples (`trajectories`: all of them, concatenated in sampling order). Samples the
        sampler did not hand over chunk by chunk (a trainer that samples its own way) are scored here, at once."""
        start = time.perf_counter()
        try:
            if self.received != len(trajectories):
                if self.received:
                    raise RewardError(f"the sampler handed {self.received} samples to the scoring of an epoch of "
                                      f"{len(trajectories)}")
                self.add(trajectories)
            self._submit(final=True)
            results = [job.result() for job in self.jobs]
        finally:
            self.blocked_seconds += time.perf_counter() - start
        return _concatenate(results, len(trajectories))

    # ---------------------------------------------------------------- internals
    def _submit(self, final: bool):
        if not self.pending:
            return
        images = self.pending[0][0] if len(self.pending) == 1 else torch.cat([p[0] for p in self.pending])
        prompts = [prompt for p in self.pending for prompt in p[1]]
        group_ids = self.pending[0][2] if len(self.pending) == 1 else torch.cat([p[2] for p in self.pending])
        count = len(prompts)
        if self.scorer.groupwise and not final:
            count = contiguous_groups_end(group_ids.tolist(), self.group_size)
        if count == 0:
            return
        if self.scorer.groupwise:
            self._check_groups(group_ids[:count], final)
        first = self.submitted
        rows = None if self.metadata is None else self.metadata[first : first + count]
        job = (images[:count], prompts[:count], rows, group_ids[:count])
        self.pending = [] if count == len(prompts) else [(images[count:], prompts[count:], group_ids[count:])]
        self.submitted += count
        if self.scorer.asynchronous:
            self.jobs.append(self.scorer.executor().submit(self._call, *job))
        else:
            future = Future()
            future.set_result(self._call(*job))  # an error is raised here, in the sampling thread
            self.jobs.append(future)

    def _call(self, images, prompts, metadata, group_ids) -> Dict[str, torch.Tensor]:
        start = time.perf_counter()
        try:
            return self.scorer.score(images, prompts, metadata, group_ids)
        finally:
            with self._lock:
                self.call_seconds += time.perf_counter() - start

    def _check_groups(self, group_ids: torch.Tensor, final: bool):
        """Whole groups, each seen once, of `group_size` samples: a group split across processes or chunks would
        be ranked on part of its samples."""
        ids, counts = torch.unique(group_ids, return_counts=True)
        for group, count in zip(ids.tolist(), counts.tolist()):
            if group in self.done_groups:
                raise RewardError(f"groupwise reward '{self.scorer.reward_label}': the samples of group {group} are "
                                  f"not consecutive; a groupwise reward needs each group's samples together")
            if self.group_size is not None and count != self.group_size:
                raise RewardError(f"groupwise reward '{self.scorer.reward_label}': group {group} has {count} samples "
                                  f"on this process, not {self.group_size} (sample_images_per_prompt): its samples "
                                  f"are split across processes")
        self.done_groups.update(ids.tolist())

    def _raise_failures(self):
        for job in self.jobs:
            if job.done() and not job.cancelled() and job.exception() is not None:
                for other in self.jobs:
                    other.cancel()
                raise job.exception()


def _concatenate(results: List[Dict[str, torch.Tensor]], count: int) -> Dict[str, torch.Tensor]:
    keys = list(results[0]) if results else ["reward"]
    for result in results[1:]:
        if list(result) != keys:
            raise RewardError(f"the reward returned the parts {sorted(result)} for one chunk of samples and "
                              f"{sorted(results[0])} for another")
    scores = {key: torch.cat([result[key] for result in results]) if results else torch.zeros(0) for key in keys}
    if scores["reward"].shape[0] != count:
        raise RewardError(f"the scoring returned {scores['reward'].shape[0]} rewards for {count} samples")
    return scores

