"""r1ray's losses against TRL 1.16's own ``GRPOTrainer._compute_loss`` on identical tensors.

TRL's method runs unbound on a small object that carries the attributes it reads; its one
model call, ``_get_per_token_logps_and_entropies``, hands back our per-token log-probs (a leaf
tensor), so loss value and gradient come from TRL's code with no model at all. Skipped where
trl is not installed (``pip install --no-deps --target DIR trl==1.16.0``, DIR on PYTHONPATH).
"""
import itertools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

from r1ray.actors.loss import LossConfig, aggregate, global_denominator, grpo_token_losses

B, T, MAX_LEN = 4, 5, 7


class _OneProcess:
    num_processes, sync_gradients = 1, True

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def _trl_loss(cfg: LossConfig, tensors: dict):
    """TRL's loss and d loss / d (logp, entropy), one process, one micro-batch, no accumulation."""
    logp = tensors["logp"].clone().requires_grad_(True)
    entropy = tensors["entropy"].clone().requires_grad_(True)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, entropy, None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=cfg.importance_sampling_level,
        beta=cfg.kl_coef, loss_type=cfg.loss_type, epsilon_low=cfg.clip_eps_low, epsilon_high=cfg.clip_eps_high,
        use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=MAX_LEN, accelerator=_OneProcess(),
        _entropy_bonus_enabled=bool(cfg.entropy_coef), entropy_coef=cfg.entropy_coef, use_adaptive_entropy=False,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(delta=cfg.delta, use_bias_correction_kl=False, steps_per_generation=1,
                             sapo_temperature_pos=cfg.sapo_temperature_pos, sapo_temperature_neg=cfg.sapo_temperature_neg))
    mask = tensors["mask"]
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": tensors["adv"], "old_per_token_logps": tensors["old"],
              "ref_per_token_logps": tensors["ref"], "num_items_in_batch": mask.sum()}
    loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return loss.item(), logp.grad, entropy.grad


def _r1ray_loss(cfg: LossConfig, tensors: dict):
    logp = tensors["logp"].clone().requires_grad_(True)
    entropy = tensors["entropy"].clone().requires_grad_(True)
    mask = tensors["mask"]
    lengths = mask.sum(-1).tolist()
    tok, _ = grpo_token_losses(logp, tensors["old"], tensors["adv"], cfg, tensors["ref"], mask)
    loss = aggregate(tok, mask, cfg.loss_type, global_denominator(cfg.loss_type, lengths, MAX_LEN, 1))
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * aggregate(entropy, mask, "dapo", float(sum(lengths)))
    loss.backward()
    return loss.item(), logp.grad, entropy.grad if cfg.entropy_coef else torch.zeros_like(entropy)


def _tensors(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])  # last: masked out
    return {"logp": logp * mask, "old": (logp + torch.randn(B, T, generator=g) * 0.4) * mask,
            "ref": (logp + torch.randn(B, T, generator=g) * 0.3) * mask, "mask": mask,
            "adv": torch.tensor([1.5, -0.7, -2.0, 0.3]), "entropy": torch.rand(B, T, generator=g) * 2}


CASES = [dict(loss_type=t, kl_coef=kl, clip_eps_high=hi, importance_sampling_level=lvl)
         for t, kl, hi, lvl in itertools.product(["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"],
                                                 [0.0, 0.04], ["plain", "higher"], ["token", "sequence"])]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_loss_and_gradient_match_trl(case):
    hi = {"plain": 0.2, "higher": 0.28} if case["loss_type"] != "cispo" else {"plain": 1.5, "higher": 5.0}
    cfg = LossConfig(**{**case, "clip_eps_high": hi[case["clip_eps_high"]]})
    for seed in range(3):
        t = _tensors(seed)
        ours, trl = _r1ray_loss(cfg, t), _trl_loss(cfg, t)
        assert ours[0] == pytest.approx(trl[0], rel=1e-5, abs=1e-7)
        assert torch.allclose(ours[1], trl[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_dual_clip_and_entropy_bonus_match_trl(loss_type):
    cfg = LossConfig(loss_type=loss_type, delta=1.5, kl_coef=0.04, entropy_coef=0.01)
    t = _tensors(7)
    t["old"] = t["old"] - 0.8 * t["mask"]  # ratios well above 1 + eps: the dual clip bites on A < 0
    ours, trl = _r1ray_loss(cfg, t), _trl_loss(cfg, t)
    assert ours[0] == pytest.approx(trl[0], rel=1e-5)
    assert torch.allclose(ours[1], trl[1], rtol=1e-5, atol=1e-7) and torch.allclose(ours[2], trl[2], rtol=1e-5, atol=1e-7)
