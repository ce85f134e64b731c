import numpy as np

from diffalign.plotting import plot_metrics, reward_band


def test_reward_band_is_clipped_to_the_observed_range(tmp_path):
    records = [{"epoch": 0, "reward_mean": 0.9, "reward_std": 0.3, "reward_min": 0.2, "reward_max": 1.0},
               {"epoch": 1, "reward_mean": 0.5, "reward_std": 0.1, "reward_min": 0.1, "reward_max": 0.99}]
    epochs, low, high = reward_band(records)
    assert epochs == [0, 1]
    np.testing.assert_allclose(low, [0.6, 0.4])
    np.testing.assert_allclose(high, [1.0, 0.6])  # 1.2 clipped to the epoch's max
    # metrics written before min/max were logged: the plain band
    _, low, high = reward_band([{k: v for k, v in r.items() if k not in ("reward_min", "reward_max")} for r in records])
    np.testing.assert_allclose(high, [1.2, 0.6])
    plot_metrics(records, ["reward_mean"], str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").stat().st_size > 0
