"""Groupwise rewards: a sample's reward is its win rate against the other samples of its prompt (Pref-GRPO).

Pref-GRPO (Wang et al., 2025, "Pref-GRPO: Pairwise Preference Reward-based GRPO for Stable Text-to-Image
Reinforcement Learning", CodeGoat24/Pref-GRPO, `fastvideo/train_flux_pref_grpo.py`, `cal_win_rate`; read, not copied)
compares every pair of a prompt's images with a pairwise judge and rewards each image with its win rate: wins over
comparisons, a comparison the judge leaves undecided counting half a win to each side. Pointwise preference scores are
what gets hacked (a small score gap blown up by the advantage normalisation); a win rate only keeps their order.

Here the comparisons come from a pointwise scorer: image i beats image j when `score_i > score_j`, a tie is half a
win each. The win rate is then the image's mid-rank in its group scaled to [0, 1] (0: worst, 1: best), so "rank" and
"win rate" rewards are one and the same. Differences from Pref-GRPO's code: no rounding to 3 decimals, and an image
alone in its group gets 0.5 (no comparison: neither a win nor a loss) where Pref-GRPO's would get 0.
"""

from typing import Dict, List, Mapping, Optional, Union

import torch

from . import GroupwiseReward, RewardError, call_reward, get_reward, register_reward, reward_name


def pairwise_wins(scores: torch.Tensor) -> torch.Tensor:
    """`W[i, j]` = 1 if image i beats image j (`score_i > score_j`), 0.5 for a tie or a comparison with a NaN score
    (undecided, as Pref-GRPO counts a judge's unclear answer), 0 if it loses; 0 on the diagonal."""
    s = scores.double()
    wins = (s[:, None] > s[None, :]).double()
    undecided = (s[:, None] == s[None, :]) | s.isnan()[:, None] | s.isnan()[None, :]
    wins = torch.where(undecided, 0.5, wins)
    wins.fill_diagonal_(0.0)
    return wins


def group_win_rates(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Each sample's win rate against the other samples of its group: `sum_j W[i, j] / (n_g - 1)` over the `n_g - 1`
    others (`pairwise_wins`), float32 `[B]` in [0, 1]. A sample alone in its group gets 0.5; a sample with a NaN score
    gets NaN (the trainer's `nonfinite_policy` decides), and its comparisons count half for the others.

    Args:
        scores (`torch.Tensor`): `[B]` pointwise scores, higher is better.
        group_ids (`torch.Tensor`): `[B]` integers, equal for the samples of one prompt.
    """
    scores = scores.reshape(-1).cpu()
    group_ids = group_ids.reshape(-1).cpu()
    rates = torch.empty(scores.shape[0], dtype=torch.float64)
    for group in torch.unique(group_ids):
        members = (group_ids == group).nonzero().squeeze(1)
        n = members.shape[0]
        if n == 1:
            rates[members] = 0.5
            continue
        rates[members] = pairwise_wins(scores[members]).sum(dim=1) / (n - 1)
    rates[scores.isnan()] = float("nan")
    return rates.float()


class WinRateReward(GroupwiseReward):
    """The within-group win rate (`group_win_rates`) of a pointwise reward's scores.

    Args:
        scorer: a pointwise reward `(images, prompts, metadata) -> Tensor[B]`.
        name (`str`): the scorer's name; its raw scores of the last call are `last_parts[name]`, which the trainers
            log as `reward_<name>_mean` (the win rates themselves average 0.5 by construction).
    """

    def __init__(self, scorer, name: str):
        self.scorer = scorer
        self.part = name
        self.name = f"{name}_rank"
        self.last_parts: Dict[str, torch.Tensor] = {}

    def score_groups(self, images: torch.Tensor, prompts: List[str], metadata: Optional[List[dict]],
                     group_ids: torch.Tensor) -> torch.Tensor:
        scores = call_reward(self.scorer, images, prompts, metadata, name=self.part)
        self.last_parts = {self.part: scores}
        return group_win_rates(scores, group_ids)

    def __repr__(self) -> str:
        return f"WinRateReward({self.part})"


@register_reward("pickscore_rank")
def pickscore_rank(model: Optional[str] = None, processor: Optional[str] = None, scale: Optional[float] = None,
                   device: Optional[Union[str, torch.device]] = None, dtype: Union[None, str, torch.dtype] = None,
                   batch_size: Optional[int] = None) -> WinRateReward:
    """PickScore turned into a groupwise reward: each image's win rate against the other images of its prompt
    (`group_win_rates` of `pickscore`'s scores; the options are `pickscore`'s). The raw PickScore is logged as
    `reward_pickscore_mean`."""
    from .clip_rewards import PICKSCORE_MODEL, PICKSCORE_PROCESSOR, pickscore

    scorer = pickscore(model=model or PICKSCORE_MODEL, processor=processor or PICKSCORE_PROCESSOR, scale=scale,
                       device=device, dtype=dtype, batch_size=batch_size)
    return WinRateReward(scorer, "pickscore")


@register_reward("win_rate")
def win_rate(reward: Union[str, Mapping], reward_kwargs: Optional[Mapping] = None) -> WinRateReward:
    """Any reward (a name, `module:function` or a mixture) turned into its within-group win rate, e.g.
    `get_reward("win_rate", reward="hpsv2")`; `reward_kwargs` are that reward's options."""
    if reward_kwargs is not None and not isinstance(reward_kwargs, Mapping):
        raise RewardError(f"reward 'win_rate': reward_kwargs must be a mapping of the scorer's options; got "
                          f"{reward_kwargs!r}")
    scorer = get_reward(reward, **dict(reward_kwargs or {}))
    if getattr(scorer, "groupwise", False) is True:
        raise RewardError(f"reward 'win_rate': {reward_name(scorer, reward)} is already groupwise; give a pointwise "
                          f"reward")
    return WinRateReward(scorer, reward_name(scorer, reward))
