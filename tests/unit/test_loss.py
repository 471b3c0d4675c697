"""The GRPO-family maths against values computed by hand."""
import math

import pytest
import torch

from r1ray.actors.advantages import group_advantages
from r1ray.actors.batching import pad_batch, step_micro_batches
from r1ray.actors.loss import (
    LossConfig,
    aggregate,
    global_denominator,
    grpo_token_losses,
    kl_estimate,
    log_importance_ratio,
)


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


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    d = -0.5  # ref - logp on token 0; token 1 agrees with the reference
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx([math.exp(d) - d - 1, 0.0])
    assert kl_estimate(logp, ref, "k1").tolist() == pytest.approx([0.5, 0.0])
    assert kl_estimate(logp, ref, "k2").tolist() == pytest.approx([0.125, 0.0])
    assert (kl_estimate(torch.randn(100), torch.randn(100)) >= 0).all()  # k3 is never negative
    with pytest.raises(ValueError, match="accepted"):
        kl_estimate(logp, ref, "k4")


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
    for mode, denom in (("dapo", float(mask.sum())), ("grpo", 6.0), ("dr_grpo", 6.0 * 5)):
        whole = aggregate(losses, mask, mode, denom)
        parts = aggregate(losses[:2], mask[:2], mode, denom) + aggregate(losses[2:], mask[2:], mode, denom)
        assert whole.item() == pytest.approx(parts.item(), rel=1e-6)
    assert aggregate(losses, mask, "dapo", float(mask.sum())).item() == pytest.approx(
        (losses * mask).sum().item() / mask.sum().item())


def test_pack_aligns_completion_positions():
    p = pad_batch([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
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


def _grad(cfg, logp, old, adv, ref=None, mask=None, denom=1.0):
    """The loss value and d loss / d logp of one batch under ``cfg``."""
    logp = logp.clone().requires_grad_(True)
    tok, _ = grpo_token_losses(logp, old, adv, cfg, ref, mask if mask is not None else torch.ones_like(logp))
    loss = aggregate(tok, mask if mask is not None else torch.ones_like(logp), cfg.loss_type, denom)
    loss.backward()
    return loss.item(), logp.grad


def test_aggregation_per_loss_type_by_hand():
    losses, mask = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert aggregate(losses, mask, "grpo", 2.0).item() == pytest.approx((1.5 + 5.0) / 2)  # sequence means, mean
    assert aggregate(losses, mask, "sapo", 2.0).item() == pytest.approx(3.25)
    assert aggregate(losses, mask, "dapo", 5.0).item() == pytest.approx(18 / 5)  # token mean over the batch
    assert aggregate(losses, mask, "cispo", 5.0).item() == pytest.approx(3.6)
    assert aggregate(losses, mask, "dr_grpo", 2.0 * 4).item() == pytest.approx(18 / 8)  # 2 sequences x L = 4
    # bnpo: each micro-batch's token mean, / micro-batches: one micro-batch = dapo, two = per-row means
    assert aggregate(losses, mask, "bnpo", 1.0).item() == pytest.approx(3.6)
    split = aggregate(losses[:1], mask[:1], "bnpo", 2.0) + aggregate(losses[1:], mask[1:], "bnpo", 2.0)
    assert split.item() == pytest.approx(1.5 / 2 + 5.0 / 2)
    assert global_denominator("dapo", [2, 3], 4, 1) == 5.0 and global_denominator("grpo", [2, 3], 4, 1) == 2.0
    assert global_denominator("dr_grpo", [2, 0], 4, 1) == 8.0 and global_denominator("bnpo", [2, 3], 4, 3) == 3.0
    assert global_denominator("dapo", [0, 0], 4, 1) == 1.0  # everything masked: no division by zero
    assert step_micro_batches([5] * 16, 2, 3) == 6  # 8 per rank -> 3 micro-batches of at most 3, on 2 ranks
    with pytest.raises(ValueError, match="accepted"):
        aggregate(losses, mask, "token_mean", 1.0)


def test_cispo_by_hand():
    # r = 0.5 / 0.25 = 2 is capped at eps_max = 1.5 and detached: loss = -1.5 A logp, gradient -1.5 A
    cfg = LossConfig(loss_type="cispo", clip_eps_high=1.5)
    loss, grad = _grad(cfg, torch.log(torch.tensor([[0.5, 0.25]])), torch.log(torch.tensor([[0.25, 0.25]])),
                       torch.tensor([2.0]), denom=2.0)
    assert loss == pytest.approx((-1.5 * 2 * math.log(0.5) - 1.0 * 2 * math.log(0.25)) / 2)
    assert grad.tolist()[0] == pytest.approx([-1.5 * 2 / 2, -1.0 * 2 / 2])


def test_sapo_by_hand():
    # r = 1: sigmoid(0) = 1/2 -> loss -(4 / tau) / 2 A; d/dlogp = -(4 / tau) sigma (1 - sigma) tau r A = -A
    cfg = LossConfig(loss_type="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    logp = torch.log(torch.tensor([[0.5], [0.5]]))
    loss, grad = _grad(cfg, logp, logp.clone(), torch.tensor([1.0, -1.0]), denom=1.0)
    assert loss == pytest.approx(-2.0 / 1.0 + 2.0 / 1.05, abs=1e-6)
    assert grad.view(-1).tolist() == pytest.approx([-1.0, 1.0])
    # r = 2, A = 1, tau = 1: the gate is soft, not clipped: sigmoid(1) x 4
    tok, _ = grpo_token_losses(torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]])), torch.tensor([1.0]), cfg)
    assert tok.item() == pytest.approx(-4 / (1 + math.exp(-1)))


def test_dual_clip_delta_by_hand():
    logp, old, adv = torch.log(torch.tensor([[0.75]])), torch.log(torch.tensor([[0.25]])), torch.tensor([-1.0])
    # r = 3, A < 0: plain PPO keeps -min(-3, -1.28) = 3; delta = 2 caps the unclipped ratio: 2, no gradient
    assert _grad(LossConfig(loss_type="dapo"), logp, old, adv)[0] == pytest.approx(3.0)
    loss, grad = _grad(LossConfig(loss_type="dapo", delta=2.0), logp, old, adv)
    assert loss == pytest.approx(2.0) and grad.item() == 0.0
    # A > 0 is untouched by delta (clip-higher caps it at 1.28 first)
    assert _grad(LossConfig(loss_type="dapo", delta=2.0), logp, old, -adv)[0] == pytest.approx(-1.28)


def test_sequence_level_ratio_gspo_by_hand():
    # token log-ratios log 2 and 0 -> the sequence's ratio is exp(log 2 / 2) = sqrt 2 on both tokens;
    # A = -1: unclipped -sqrt 2 < clipped -1.28 -> loss sqrt 2 per token; d r / d logp_t = r / 2
    cfg = LossConfig(loss_type="grpo", importance_sampling_level="sequence")
    logp, old = torch.log(torch.tensor([[0.5, 0.3]])), torch.log(torch.tensor([[0.25, 0.3]]))
    loss, grad = _grad(cfg, logp, old, torch.tensor([-1.0]), denom=1.0)
    assert loss == pytest.approx(math.sqrt(2))
    # the sequence's loss is its token mean, r: both tokens get d r / d logp_t = r / 2
    assert grad.tolist()[0] == pytest.approx([math.sqrt(2) / 2, math.sqrt(2) / 2])
    with pytest.raises(ValueError, match="mask"):
        grpo_token_losses(logp, old, torch.tensor([1.0]), cfg)


def test_kl_in_the_loss_or_in_the_reward():
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    for est, value in (("k1", 0.5), ("k2", 0.125), ("k3", math.exp(-0.5) - 0.5)):
        loss, parts = grpo_token_losses(logp, logp.clone(), torch.tensor([0.0]), LossConfig(kl_coef=0.1, kl_estimator=est), ref)
        assert loss.item() == pytest.approx(0.1 * value) and parts["kl"].item() == pytest.approx(value)
    loss, parts = grpo_token_losses(logp, logp.clone(), torch.tensor([0.0]), LossConfig(kl_coef=0.1, kl_in_reward=True), ref)
    assert loss.item() == 0.0 and "kl" not in parts



def test_a_capped_kl_bounds_a_token_the_reference_finds_far_likelier():
    """``kl_max``: each token's estimate clamped to [-kl_max, kl_max] (veRL's k3 at 10), by hand.
    The case measured in a colocated vLLM run (one step's KL 2.51, gradient norm 8.2): among
    4,480 sampled tokens one the policy gives 1e-4 and the reference 0.9 (d = 9.1, k3 about
    8,900). Uncapped, that token's KL gradient d k3 / d logp = 1 - exp(d) outweighs a policy
    token's |A| = 1 nearly 90 times at beta 0.01; capped, it adds nothing, and the tokens under
    the cap keep exactly their value and gradient."""
    d_far = math.log(0.9) - math.log(1e-4)
    logp = torch.tensor([[math.log(1e-4), -1.0, -0.2]], requires_grad=True)
    ref = torch.tensor([[math.log(0.9), -1.5, 3.0]])  # d = 9.1, -0.5, 3.2 (k3 = 21.3: capped too)
    k3 = [math.exp(d) - d - 1 for d in (d_far, -0.5, 3.2)]
    assert kl_estimate(logp, ref, "k3").tolist()[0] == pytest.approx(k3)
    assert kl_estimate(logp, ref, "k3", cap=10.0).tolist()[0] == pytest.approx([10.0, k3[1], 10.0])
    assert kl_estimate(logp, ref, "k1", cap=1.0).tolist()[0] == pytest.approx([-1.0, 0.5, -1.0])  # both signs
    assert kl_estimate(logp, ref, "k2", cap=10.0).tolist()[0] == pytest.approx([10.0, 0.125, 5.12])
    cfg = dict(kl_coef=0.01, kl_estimator="k3")
    for cap, grads in ((None, [0.01 * (1 - math.exp(d_far)), 0.01 * (1 - math.exp(-0.5)), 0.01 * (1 - math.exp(3.2))]),
                       (10.0, [0.0, 0.01 * (1 - math.exp(-0.5)), 0.0])):
        logp.grad = None
        loss, parts = grpo_token_losses(logp, logp.detach().clone(), torch.tensor([0.0]), LossConfig(**cfg, kl_max=cap), ref)
        loss.sum().backward()
        assert logp.grad.tolist()[0] == pytest.approx(grads)
    assert abs(0.01 * (1 - math.exp(d_far))) > 89  # the uncapped token against a policy token's |A| = 1
    # far past exp's overflow the cap still holds, with a zero gradient rather than nan
    logp = torch.tensor([-100.0], requires_grad=True)
    (kl := kl_estimate(logp, torch.tensor([0.0]), "k3", cap=10.0)).sum().backward()
    assert kl.item() == 10.0 and logp.grad.item() == 0.0

@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_zero_advantages_give_zero_policy_gradient(loss_type, level):
    torch.manual_seed(1)
    cfg = LossConfig(loss_type=loss_type, importance_sampling_level=level, clip_eps_high=5.0 if loss_type == "cispo" else 0.28)
    _, grad = _grad(cfg, torch.randn(3, 4) - 2, torch.randn(3, 4) - 2, torch.zeros(3), mask=torch.ones(3, 4), denom=3.0)
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_identical_logprobs_give_a_ratio_of_exactly_one(level):
    logp = torch.randn(3, 4) - 2
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    r = torch.exp(log_importance_ratio(logp, logp.clone(), level, mask))
    assert torch.equal(r, torch.ones_like(r))
    _, parts = grpo_token_losses(logp, logp.clone(), torch.ones(3), LossConfig(importance_sampling_level=level), mask=mask)
    assert torch.equal(parts["ratio"], torch.ones_like(logp)) and not parts["clipped"].any()


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "cispo", "sapo"])
def test_update_does_not_depend_on_ranks_and_micro_batches(loss_type):
    """The whole batch in one piece vs 2 ranks x micro-batches of 2 (DeepSpeed averages ranks, the
    learner multiplies by world_size): same loss and same gradient. bnpo is local by definition."""
    torch.manual_seed(0)
    cfg = LossConfig(loss_type=loss_type, kl_coef=0.05, clip_eps_high=5.0 if loss_type == "cispo" else 0.28)
    logp, old, ref = torch.randn(8, 6) - 2, torch.randn(8, 6) - 2, torch.randn(8, 6) - 2
    adv, mask = torch.randn(8), (torch.rand(8, 6) > 0.3).long()
    lengths = mask.sum(-1).tolist()
    denom = global_denominator(loss_type, lengths, 6, step_micro_batches([1] * 8, 2, 2))
    whole_loss, whole_grad = _grad(cfg, logp, old, adv, ref, mask, denom)
    world, parts_grad, parts_loss = 2, torch.zeros_like(logp), 0.0
    for rank_rows in (range(0, 4), range(4, 8)):
        for mb in (list(rank_rows)[:2], list(rank_rows)[2:]):
            loss, grad = _grad(cfg, logp[mb], old[mb], adv[mb], ref[mb], mask[mb], denom)
            parts_loss += loss * world / world  # each rank scales by world_size, DeepSpeed averages
            parts_grad[mb] = grad
    assert parts_loss == pytest.approx(whole_loss, rel=1e-5)
    assert torch.allclose(parts_grad, whole_grad, atol=1e-7)


@pytest.mark.parametrize("entropy", ["no", "log", "grad"])
def test_chunked_logprobs_equal_the_whole_vocabulary_computation(tiny_model, entropy):
    """The LM head on completion positions only, 5 tokens at a time with recomputation in
    backward: the same log-probs, entropies and gradients as full logits."""
    from transformers import AutoModelForCausalLM

    from r1ray.actors.batching import _full_token_logprobs, token_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    packed = pad_batch([[1, 5, 9], [2, 4], [7, 7, 7, 7]], [[3, 8, 2, 6], [9] * 9, [4]], pad_id=0)
    results = []
    for fn in (lambda: token_logprobs(model, packed, 0.7, entropy, chunk_tokens=5),
               lambda: _full_token_logprobs(model, packed, 0.7, entropy)):
        model.zero_grad()
        out = fn()
        logp, ent = (out, None) if entropy == "no" else out
        loss = -(logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum()
        if entropy == "grad":
            loss = loss - 0.3 * ent.sum()
        loss.backward()
        results.append((logp.detach(), None if ent is None else ent.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp, ent, grads), (lp_full, ent_full, grads_full) = results
    assert (lp != 0).sum() == packed.completion_mask.sum()
    assert torch.allclose(lp, lp_full, atol=1e-5)
    if entropy != "no":
        assert torch.allclose(ent, ent_full, atol=1e-5) and (ent_full * (1 - packed.completion_mask)).abs().max() == 0
    for name in grads:
        assert torch.allclose(grads[name], grads_full[name], atol=1e-5), name
