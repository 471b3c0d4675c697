"""The GRPO maths against values computed by hand."""
import math

import pytest
import torch

from r1ray.actors.batching import pack
from r1ray.actors.loss import LossConfig, aggregate, group_advantages, grpo_token_losses, k3_kl


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(r, group_size=4, eps=0.0)
    # group 1: mean 0.25, unbiased std = sqrt(((0.75)^2 + 3 * 0.25^2) / 3) = 0.5
    assert adv[:4].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5])
    # group 2: all equal -> zero advantage, no NaN (eps only protects the division)
    assert group_advantages(r, 4)[4:].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert group_advantages(r, 4, scale="none")[:4].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)
    with pytest.raises(ValueError, match="accepted"):
        group_advantages(r, 4, scale="rank")


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    d = -0.5
    assert k3_kl(logp, ref).tolist() == pytest.approx([math.exp(d) - d - 1, 0.0])
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()  # k3 is never negative


def test_clipped_surrogate_by_hand():
    cfg = LossConfig(clip_eps_low=0.2, clip_eps_high=0.3, kl_coef=0.0)
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]]))
    pos, _ = grpo_token_losses(logp, old, torch.tensor([2.0]), cfg)
    # A > 0: min(r A, clip(r, 0.8, 1.3) A) -> r = 1.5 is capped at 1.3, r = 0.5 stays (min picks it)
    assert (-pos).tolist()[0] == pytest.approx([2.0, 2.6, 1.0, 2.2])
    neg, parts = grpo_token_losses(logp, old, torch.tensor([-1.0]), cfg)
    # A < 0: r = 0.5 is floored at 0.8 (min(-0.5, -0.8) = -0.8); r = 1.5 keeps -1.5
    assert (-neg).tolist()[0] == pytest.approx([-1.0, -1.5, -0.8, -1.1])
    assert parts["clipped"].tolist()[0] == [False, False, True, False]


def test_kl_term_is_added_with_its_weight():
    cfg = LossConfig(kl_coef=0.5)
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-2.0]])
    loss, parts = grpo_token_losses(logp, logp.clone(), torch.tensor([0.0]), cfg, ref)
    assert loss.item() == pytest.approx(0.5 * (math.exp(-1.0) + 1.0 - 1.0))
    assert parts["kl"].item() == pytest.approx(math.exp(-1) + 1 - 1)


def test_aggregation_does_not_depend_on_how_the_batch_is_split():
    torch.manual_seed(0)
    losses, mask = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).long()
    for mode, denom in (("token_mean", float(mask.sum())), ("seq_mean", 6.0)):
        whole = aggregate(losses, mask, mode, denom)
        parts = aggregate(losses[:2], mask[:2], mode, denom) + aggregate(losses[2:], mask[2:], mode, denom)
        assert whole.item() == pytest.approx(parts.item(), rel=1e-6)
    assert aggregate(losses, mask, "token_mean", float(mask.sum())).item() == pytest.approx(
        (losses * mask).sum().item() / mask.sum().item())


def test_pack_aligns_completion_positions():
    p = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert p.input_ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    # position t predicts token t+1: completion tokens of row 0 are at 3,4 -> mask positions 2,3
    assert p.completion_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    vals = p.scatter([[0.1, 0.2], [0.3, 0.4, 0.5]])
    assert p.gather(vals) == [pytest.approx([0.1, 0.2]), pytest.approx([0.3, 0.4, 0.5])]


def test_off_policy_corrections_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.2]])).requires_grad_(True)
    behaviour = torch.log(torch.tensor([[0.25, 0.4]]))  # token 0 is 2x likelier now, token 1 half as likely
    adv = torch.tensor([1.0])
    none, parts = grpo_token_losses(logp, behaviour, adv, LossConfig(off_policy="none", clip_eps_high=0.28))
    assert parts["ratio"].tolist()[0] == pytest.approx([2.0, 0.5])
    assert (-none).tolist()[0] == pytest.approx([1.28, 0.5])  # PPO clip against the behaviour policy
    dec, parts = grpo_token_losses(logp, behaviour, adv, LossConfig(off_policy="decoupled"))
    # proximal = current weights: ratio 1 in value, the importance weight carries pi_prox / pi_behaviour
    assert (-dec).tolist()[0] == pytest.approx([2.0, 0.5])
    assert parts["is_weight"].tolist()[0] == pytest.approx([2.0, 0.5])
    tis, parts = grpo_token_losses(logp, behaviour, adv, LossConfig(off_policy="tis", is_cap=1.5))
    assert (-tis).tolist()[0] == pytest.approx([1.5, 0.5])
    assert parts["is_truncated"].tolist()[0] == [True, False]
    # the gradient is w * A * d logp: the weight scales, the ratio's value (1) does not clip
    tis.sum().backward()
    assert logp.grad.tolist()[0] == pytest.approx([-1.5, -0.5])
