"""Advantage estimators against values computed by hand."""
import math

import pytest
import torch

from r1ray.actors.advantages import batch_advantages, group_advantages, kl_shaped_returns, rloo_advantages


def test_rloo_leave_one_out_by_hand():
    # group [1, 0, 0, 0]: the others' mean is 0 for the first, 1/3 for the rest
    assert rloo_advantages(torch.tensor([1.0, 0, 0, 0, 2, 2, 2, 2]), 4).tolist() == pytest.approx(
        [1.0, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="groups of 3"):
        rloo_advantages(torch.zeros(4), 3)


def test_batch_scale_uses_the_whole_batch_std():
    r = torch.tensor([1.0, 0.0, 3.0, 2.0])  # groups [1, 0] and [3, 2]: centred +-0.5, batch std of r
    std = torch.tensor([1.0, 0.0, 3.0, 2.0]).std().item()
    assert group_advantages(r, 2, "batch", eps=0).tolist() == pytest.approx([0.5 / std, -0.5 / std] * 2)


def test_reinforce_pp_whitens_tokens_over_the_batch_by_hand():
    # rewards 1 (2 tokens) and 0 (1 token): token returns [1, 1], [0]; mean 2/3, unbiased std sqrt(1/3)
    adv = batch_advantages([1.0, 0.0], 2, "reinforce_pp", lengths=[2, 1])
    s = math.sqrt(1 / 3)
    assert adv[0] == pytest.approx([(1 / 3) / s] * 2) and adv[1] == pytest.approx([(-2 / 3) / s])
    # KL folded in per token: returns [1 - 0.3, 1 - 0.2], [0 - 0.3] -> mean 0.4, std sqrt(0.37)
    adv = batch_advantages([1.0, 0.0], 2, "reinforce_pp", lengths=[2, 1], token_kl=[[0.1, 0.2], [0.3]], kl_coef=1.0)
    s = math.sqrt(0.37)
    assert adv[0] == pytest.approx([0.3 / s, 0.4 / s], rel=1e-5) and adv[1] == pytest.approx([-0.7 / s], rel=1e-5)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    returns = kl_shaped_returns(torch.tensor([1.0, 0.0]), torch.tensor([[0.1, 0.2], [0.3, 9.0]]), mask, 1.0)
    assert returns.view(-1).tolist() == pytest.approx([0.7, 0.8, -0.3, 0.0])  # padding's KL is ignored


def test_kl_in_the_reward_for_group_estimators():
    # rewards 1 and 0 minus 0.5 x summed KL (0.4 and 0.2): 0.8 and -0.1 -> group-centred +-0.45
    adv = batch_advantages([1.0, 0.0], 2, "grpo", "none", [2, 1], [[0.1, 0.3], [0.2]], 0.5)
    assert adv == pytest.approx([0.45, -0.45])
    assert batch_advantages([1.0, 0.0], 2, "rloo", lengths=[2, 1]) == pytest.approx([1.0, -1.0])
    with pytest.raises(ValueError, match="accepted"):
        batch_advantages([1.0, 0.0], 2, "ppo")
