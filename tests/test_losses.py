import itertools

import numpy as np
import pytest
import torch

from diffalign.advantages import PerPromptStatTracker, batch_advantages, group_advantages
from diffalign.losses import ppo_clipped_loss, prdp_loss


def test_ppo_clipped_loss_against_hand_computation():
    log_probs = torch.tensor([0.0, 0.2, -0.2, 0.05])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0])
    eps = 0.1
    out = ppo_clipped_loss(log_probs, old, adv, eps)
    ratio = np.exp([0.0, 0.2, -0.2, 0.05])
    # per entry: max(-A r, -A clip(r))
    expected = [
        max(-1 * ratio[0], -1 * np.clip(ratio[0], 0.9, 1.1)),
        max(-1 * ratio[1], -1 * 1.1),
        max(1 * ratio[2], 1 * 0.9),
        max(2 * ratio[3], 2 * ratio[3]),
    ]
    assert out["loss"].item() == pytest.approx(np.mean(expected), rel=1e-6)
    assert out["approx_kl"].item() == pytest.approx(0.5 * np.mean(np.array([0, 0.2, -0.2, 0.05]) ** 2), rel=1e-6)
    assert out["clipfrac"].item() == pytest.approx(0.5)


def test_ppo_gradient_vanishes_when_clipped_in_advantage_direction():
    log_probs = torch.tensor([0.5], requires_grad=True)  # ratio far above 1 + eps
    ppo_clipped_loss(log_probs, torch.zeros(1), torch.tensor([1.0]), 1e-4)["loss"].backward()
    assert log_probs.grad.item() == 0.0


def reference_prdp_loss(log_probs, old, ref, rewards, groups, beta, eps):
    """Independent reference: a NumPy port of the paper's Appendix G JAX loss, applied per prompt group, with the
    per-pair losses of all groups averaged together (pairs with reward_diff > 0 only)."""
    log_probs, old, ref, rewards = (np.asarray(a, dtype=np.float64) for a in (log_probs, old, ref, rewards))
    pair_losses = []
    for g in np.unique(groups):
        idx = np.where(np.asarray(groups) == g)[0]
        lr = log_probs[idx] - ref[idx]
        lr_old = old[idx] - ref[idx]
        lr_clip = np.clip(lr, lr_old - eps, lr_old + eps)
        imp, imp_clip = lr.mean(axis=1), lr_clip.mean(axis=1)
        for a, b in itertools.permutations(range(len(idx)), 2):
            diff = rewards[idx][a] - rewards[idx][b]
            if diff <= 0:
                continue
            unclipped = (imp[a] - imp[b] - diff / beta) ** 2
            clipped = (imp_clip[a] - imp_clip[b] - diff / beta) ** 2
            pair_losses.append(max(unclipped, clipped))
    return np.mean(pair_losses) if pair_losses else 0.0


@pytest.mark.parametrize("seed", range(5))
def test_prdp_loss_matches_reference_with_uneven_groups_and_ties(seed):
    rng = np.random.default_rng(seed)
    groups = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])  # groups of 3, 2, 4 and a lone sample
    rewards = rng.normal(size=10).round(1)
    rewards[1] = rewards[0]  # a tie, dropped
    rewards[6] = rewards[7]
    old = rng.normal(size=(10, 6)) * 0.01
    ref = old + rng.normal(size=(10, 6)) * 0.01
    log_probs = old + rng.normal(size=(10, 6)) * 0.02
    beta, eps = 2.0, 0.01
    got = prdp_loss(torch.tensor(log_probs), torch.tensor(old), torch.tensor(ref), torch.tensor(rewards),
                    torch.tensor(groups), beta, eps)
    assert got.item() == pytest.approx(reference_prdp_loss(log_probs, old, ref, rewards, groups, beta, eps), rel=1e-5)


def test_prdp_loss_is_zero_when_implicit_differences_equal_reward_differences():
    beta = 0.5
    rewards = torch.tensor([1.0, 0.2, -0.3, 0.7])
    groups = torch.tensor([0, 0, 1, 1])
    ref = torch.randn(4, 5)
    # implicit reward (mean over steps of log pi - log pi_ref) = r / beta + per-group constant
    log_probs = ref + (rewards / beta + torch.tensor([3.0, 3.0, -1.0, -1.0]))[:, None]
    loss = prdp_loss(log_probs, log_probs.clone(), ref, rewards, groups, beta, clip_eps=1e-3)
    assert loss.item() == pytest.approx(0.0, abs=1e-8)


def test_prdp_clipping_at_epsilon():
    eps, beta = 0.1, 1.0
    ref = torch.zeros(2, 1)
    old = torch.zeros(2, 1)
    rewards = torch.tensor([1.0, 0.0])
    groups = torch.tensor([0, 0])
    # Moving sample a's log-ratio beyond old + eps: the clipped term freezes at eps, the loss takes the max.
    for delta, expected in [(0.05, (0.05 - 1) ** 2), (0.5, max((0.5 - 1) ** 2, (0.1 - 1) ** 2)),
                            (-0.5, max((-0.5 - 1) ** 2, (-0.1 - 1) ** 2))]:
        log_probs = torch.tensor([[delta], [0.0]], requires_grad=True)
        loss = prdp_loss(log_probs, old, ref, rewards, groups, beta, eps)
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        loss.backward()
    # Beyond +eps towards the target, the clipped (larger) error is constant in sample a: no gradient moves a
    # further, while b (still inside its trust region) keeps its gradient.
    log_probs = torch.tensor([[0.5], [0.0]], requires_grad=True)
    prdp_loss(log_probs, old, ref, rewards, groups, beta, eps).backward()
    assert log_probs.grad[0].item() == 0.0 and log_probs.grad[1].item() != 0.0


def test_prdp_loss_without_pairs_is_zero_with_gradient_path():
    log_probs = torch.randn(3, 4, requires_grad=True)
    loss = prdp_loss(log_probs, log_probs.detach(), torch.zeros(3, 4), torch.tensor([1.0, 1.0, 2.0]),
                     torch.tensor([0, 0, 1]), 1.0, 0.1)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


def test_advantages():
    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0])
    groups = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(group_advantages(rewards, groups, eps=0.0), torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    a = batch_advantages(rewards)
    assert a.mean().abs() < 1e-6 and a.std(unbiased=False) == pytest.approx(1.0, rel=1e-5)

    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    first = tracker.update(["a", "a", "b", "b"], rewards)  # buffers of 2 < 3: batch statistics
    torch.testing.assert_close(first, (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6))
    second = tracker.update(["a", "a"], torch.tensor([2.0, 2.0]))  # buffer a = [1, 3, 2, 2]
    buffer = np.array([1.0, 3.0, 2.0, 2.0])
    assert second[0].item() == pytest.approx((2.0 - buffer.mean()) / (buffer.std() + 1e-6))
    restored = PerPromptStatTracker()
    restored.load_state_dict(tracker.state_dict())
    assert restored.state_dict() == tracker.state_dict()
