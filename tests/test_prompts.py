import numpy as np
import pytest

from diffalign.config import ConfigError, DDPOConfig
from diffalign.prompts import PromptDifficulty, PromptError, PromptSource


def test_moderate_prompts_get_the_largest_weights():
    difficulty = PromptDifficulty(buffer_size=8, min_count=4, floor=0.1)
    difficulty.record(["solved"] * 8 + ["hard"] * 8 + ["mixed"] * 8,
                      [1.0] * 8 + [0.0] * 7 + [0.2] + [0.0, 1.0] * 4)
    weights = difficulty.weights(["solved", "hard", "mixed", "unseen"])
    top = 0.5  # std of the mixed prompt's 0/1 rewards
    np.testing.assert_allclose(weights, [0.1 * top, np.std([0.0] * 7 + [0.2]), top, top])


def test_difficulty_buffer_keeps_recent_finite_rewards_and_round_trips():
    difficulty = PromptDifficulty(buffer_size=3, min_count=1)
    difficulty.record(["a"] * 5, [0.0, 0.0, 1.0, float("nan"), 3.0])
    assert difficulty.rewards["a"] == [0.0, 1.0, 3.0]
    restored = PromptDifficulty()
    restored.load_state_dict(difficulty.state_dict())
    assert restored.rewards == difficulty.rewards and restored.buffer_size == 3


def test_weighted_draws_follow_the_weights_and_are_reproducible():
    source = PromptSource(prompts=["a", "b", "c"])
    weights = np.array([0.0, 1.0, 3.0])
    draws = source.epoch_prompts(0, 4000, seed=1, weights=weights)
    assert draws == source.epoch_prompts(0, 4000, seed=1, weights=weights)
    assert "a" not in draws and 0.7 < draws.count("c") / len(draws) < 0.8
    with pytest.raises(PromptError, match="prompt list"):
        PromptSource(fn=lambda: "x").epoch_prompts(0, 2, seed=0, weights=np.ones(1))


def test_unknown_prompt_selection_is_a_config_error():
    with pytest.raises(ConfigError, match="sample_prompt_selection"):
        DDPOConfig(sample_prompt_selection="hardest").validate()
