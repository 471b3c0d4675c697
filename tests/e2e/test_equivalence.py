"""Every learner configuration equals one plain PyTorch step (``learner_reference.py``).

ZeRO-0/1/2/3 x one and two ranks x one micro-batch and several, for GRPO (every loss type,
off-policy corrections, per-token advantages, ``num_iterations`` 2, LoRA) and SFT (padded and
packed rows, LoRA), micro-batches counted in rows or formed by a token budget, in fp32 from the same weights on the same batches, three steps each. Per
step the loss and the gradient norm, and the weights after the last step, must equal the
reference's.

Tolerances (fp32): losses within 1e-5 and gradient norms within 1e-4 relative: the only
differences are summation orders (micro-batch partial sums, padding widths, gloo's all-reduce,
the chunked LM head against full logits), ~1e-7 relative. Weights: ||w - w_ref|| / ||w_ref - w0||
below 1e-3. AdamW divides each gradient element by its own running RMS, so elements whose
gradient is at round-off level take updates of either sign: measured 2e-5..2e-4 here, against
1.25 for ZeRO-3 keeping only the last micro-batch's gradient (the defect these tests were
written for) and 1.0 for a step that uses the wrong starting weights.
"""
import dataclasses

import pytest
import torch
from learner_reference import Case, grpo_batches, learner_logprob_gap, reference_run, run_world, sft_batches, weight_gap

from r1ray.actors.learner import LearnerConfig, LearnerRank
from r1ray.actors.lora import LoraConfig
from r1ray.actors.loss import LossConfig
from r1ray.cluster.groups import free_port

KL = LossConfig(kl_coef=0.05)  # dapo (the default) with a KL term against the reference log-probs
LORA = LoraConfig(r=4, alpha=8, dropout=0.0)  # no dropout: the reference draws no masks


def _cases() -> list[Case]:
    cases = [Case(f"{kind}-zero{z}-mb{mb}", kind, z, mb, loss=KL) for kind in ("grpo", "sft") for z in (0, 1, 2, 3)
             for mb in (2, 12)]  # 12: the whole shard in one micro-batch; 2: three or six of them
    losses = {
        "grpo-seq": LossConfig(loss_type="grpo", importance_sampling_level="sequence"),
        "bnpo": LossConfig(loss_type="bnpo"),
        "dr_grpo": LossConfig(loss_type="dr_grpo", delta=1.5),
        "dapo-entropy": LossConfig(loss_type="dapo", entropy_coef=0.01, kl_coef=0.05, kl_estimator="k2"),
        "cispo": LossConfig(loss_type="cispo", clip_eps_high=1.2),
        "sapo": LossConfig(loss_type="sapo"),
        "decoupled": LossConfig(off_policy="decoupled"),
        "tis": LossConfig(off_policy="tis", is_cap=1.1),
    }
    for name, loss in losses.items():
        cases += [Case(f"grpo-{name}-zero{z}-mb2", "grpo", z, 2, loss=loss) for z in (0, 3)]
    cases += [Case(f"grpo-per_token_advantages-zero{z}-mb2", "grpo", z, 2) for z in (1, 3)]
    cases += [Case(f"grpo-iterations2-zero{z}-mb2", "grpo", z, 2, loss=LossConfig(num_iterations=2)) for z in (2, 3)]
    cases += [Case(f"sft-packed-zero{z}-mb2", "sft", z, 2, packed=True) for z in (2, 3)]
    cases += [Case(f"{kind}-lora-zero{z}-mb2", kind, z, 2, loss=KL, lora=LORA) for kind in ("grpo", "sft")
              for z in (0, 1, 2)]  # LoRA with ZeRO-3 is refused by the config
    # Token-budget micro-batches: rows regrouped by length, shards balanced by tokens, micro-batch
    # counts that differ between ranks; the step is still the reference's.
    budget = {"tokens": KL, "tokens-grpo-seq": losses["grpo-seq"], "tokens-bnpo": losses["bnpo"],
              "tokens-iterations2": LossConfig(num_iterations=2)}
    cases += [Case(f"grpo-{name}-zero{z}", "grpo", z, 12, loss=loss, max_tokens=100) for name, loss in budget.items()
              for z in (0, 3)]
    cases += [Case(f"sft-tokens{'-packed' if packed else ''}-zero{z}", "sft", z, 12, packed=packed, max_tokens=60)
              for packed in (False, True) for z in (2, 3)]
    # Steps of 12, 8, 12 rows (packing makes row counts vary): DeepSpeed must end each step
    # after its own micro-batches, not after the count the previous step left behind.
    cases += [Case(f"sft-uneven-zero{z}-mb2", "sft", z, 2) for z in (2, 3)]
    return cases


CASES = _cases()
# Ulysses sequence parallelism: two ranks, one group, each rank holding half of every row.
SP_CASES = [Case(f"grpo-sp2-zero{z}-mb2", "grpo", z, 2, loss=KL, sp=2) for z in (0, 2, 3)] + [
    Case("grpo-sp2-grpo-seq-zero2-mb2", "grpo", 2, 2, loss=LossConfig(loss_type="grpo", importance_sampling_level="sequence"), sp=2),
    Case("grpo-sp2-dapo-entropy-zero2-mb2", "grpo", 2, 2, sp=2,
         loss=LossConfig(loss_type="dapo", entropy_coef=0.01, kl_coef=0.05, kl_estimator="k2")),
    Case("grpo-sp2-bnpo-zero2-mb2", "grpo", 2, 2, loss=LossConfig(loss_type="bnpo"), sp=2),
    Case("grpo-sp2-iterations2-zero3-mb2", "grpo", 3, 2, loss=LossConfig(num_iterations=2), sp=2),
    Case("grpo-sp2-tokens-zero2", "grpo", 2, 12, loss=KL, max_tokens=100, sp=2),
    Case("grpo-sp2-checkpointing-zero2-mb2", "grpo", 2, 2, loss=KL, sp=2, checkpointing=True),
    Case("sft-sp2-zero2-mb2", "sft", 2, 2, sp=2),
    Case("sft-sp2-zero3-mb2", "sft", 3, 2, sp=2),
    Case("sft-sp2-uneven-zero2-mb2", "sft", 2, 2, sp=2),
]


@pytest.fixture(scope="module")
def batches(tiny_model):
    grpo = grpo_batches(tiny_model, 3)
    per_token = [[dataclasses.replace(s, advantage=[s.advantage * 0.9 ** t for t in range(len(s.completion_ids))])
                  for s in b] for b in grpo]  # REINFORCE++-style per-token advantages
    sft = sft_batches(3)
    return {"grpo": grpo, "grpo_per_token": per_token, "sft": sft, "sft_uneven": [sft[0], sft[1][:8], sft[2]]}


def _batches_of(case: Case, batches: dict) -> list:
    return batches["grpo_per_token" if "per_token" in case.name else "sft_uneven" if "uneven" in case.name
                   else case.kind]


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def world(request, tiny_model, batches, tmp_path_factory):
    """Every case through a learner world of 1 or 2 ranks (one spawn, ~1 s a case); the cases of
    1 rank split over two such worlds side by side, one a core."""
    ranks = request.param
    return ranks, run_world(tiny_model, CASES, ranks, {c.name: _batches_of(c, batches) for c in CASES},
                            str(tmp_path_factory.mktemp("eq")), worlds=2 if ranks == 1 else 1)


@pytest.fixture(scope="module")
def sp_world(tiny_model, batches, tmp_path_factory):
    return 2, run_world(tiny_model, SP_CASES, 2, {c.name: _batches_of(c, batches) for c in SP_CASES},
                        str(tmp_path_factory.mktemp("sp")))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_learner_step_equals_the_plain_pytorch_step(world, case, tiny_model, batches):
    _check_against_the_reference(world, case, tiny_model, batches)


@pytest.mark.parametrize("case", SP_CASES, ids=[c.name for c in SP_CASES])
def test_sequence_parallel_step_equals_the_plain_pytorch_step(sp_world, case, tiny_model, batches):
    """DeepSpeed's Ulysses attention over gloo (all-to-all), the log-probs gathered back into
    whole rows: the step of one sequence-parallel group of 2 is the plain step on the batch."""
    _check_against_the_reference(sp_world, case, tiny_model, batches)


def _check_against_the_reference(world, case, tiny_model, batches):
    ranks, results = world
    got = results[case.name]
    ref = reference_run(tiny_model, case, ranks, got["init"], _batches_of(case, batches))
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-5)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert weight_gap(got["state"], ref["state"], got["init"]) < 1e-3
    assert got["zero_stage"] == case.zero_stage


def _learner(tiny_model, **kw) -> LearnerRank:
    learner = LearnerRank(tiny_model, LearnerConfig(num_ranks=1, **kw), rank=0, world_size=1)
    learner.setup("127.0.0.1", free_port())
    return learner


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_hf_behaviour_logprobs_equal_the_learners(tiny_model, zero_stage):
    """What the hf generator returns for its own samples is what the learner computes for the
    same tokens at the same weights: an on-policy step's ratio is 1 within 1e-4."""
    from tiny_actors import prompt as _prompt

    from r1ray.actors.generator import Generator, GeneratorConfig, SamplingConfig

    learner = _learner(tiny_model, zero_stage=zero_stage, micro_batch_size=4)
    for temperature in (1.0, 0.7):
        gen = Generator(tiny_model, GeneratorConfig(backend="hf"), seed=11)
        prompts = [_prompt(tiny_model, f"{a}+{b}", f"p{a}") for a, b in ((123, 456), (905, 218), (777, 333))]
        rollouts = gen.generate(prompts, 4, SamplingConfig(max_new_tokens=40, temperature=temperature))
        gap = learner_logprob_gap(learner, rollouts, temperature)
        print(f"hf generator vs learner (ZeRO-{zero_stage}, T={temperature}): worst |logp gap| {gap:.2e} "
              f"over {sum(len(r.completion_ids) for r in rollouts)} tokens")
        assert gap < 1e-4


def test_packed_rows_under_flash_attention_equal_unpacked(tiny_model):
    """transformers' FlashAttention-2 path (``flash_reference``: its dispatch, torch kernels)
    reads packing from position ids only in a batch of one row: the learner flattens a packed
    micro-batch into one row, and its held-out loss equals the unpacked one."""
    import random

    from flash_reference import flash_attention_2

    from r1ray.actors.batching import token_logprobs
    from r1ray.actors.packing import SftExample, sft_batch

    rng = random.Random(0)
    ex = [SftExample([rng.randint(3, 250) for _ in range(n)], [0] * 3 + [1] * (n - 3)) for n in (10, 7, 12, 5, 9, 8)]
    packed, unpacked = [ex[0:2], ex[2:4], ex[4:6]], [[e] for e in ex]
    learner = _learner(tiny_model, zero_stage=3, micro_batch_size=3)
    module = learner.engine.module
    with flash_attention_2(module):
        flat = learner.sft_eval(packed, 1)
        alone = learner.sft_eval(unpacked, 2)
        assert flat.nll_sum == pytest.approx(alone.nll_sum, rel=1e-6) and flat.tokens == alone.tokens
        assert flat.slots == sum(len(e.ids) for e in ex)  # one row, no padding
        with torch.no_grad():  # the defect: rows of packed examples, as one batch, attend across examples
            batch = sft_batch(packed, learner.pad_id)
            across = float(-(token_logprobs(learner.engine, batch) * batch.completion_mask).sum())
        assert abs(across - alone.nll_sum) > 1e-3


def test_bf16_step_is_within_bf16_of_the_fp32_reference(tiny_model, batches):
    """One bf16 step on this CPU (DeepSpeed's bf16 optimizer, fp32 master weights and gradient
    accumulation) against the fp32 reference step: the loss within 1%, the gradient norm within
    2%, and the update's direction (cosine) above 0.98."""
    import torch.nn.functional as F
    from learner_reference import learner_run

    case = Case("bf16", "grpo", 2, 3, loss=KL, dtype="bfloat16", steps=1)
    got = learner_run(tiny_model, case, 0, 1, free_port(), batches["grpo"][:1], )
    assert got["data_types"] == ("torch.bfloat16", "torch.float32")  # bf16 weights, fp32 gradient accumulation
    ref = reference_run(tiny_model, case, 1, {k: v.float() for k, v in got["init"].items()}, batches["grpo"][:1])
    assert got["loss"][0] == pytest.approx(ref["loss"][0], rel=1e-2)
    assert got["grad_norm"][0] == pytest.approx(ref["grad_norm"][0], rel=2e-2)
    delta = torch.cat([(got["state"][k].float() - got["init"][k].float()).flatten() for k in ref["state"]])
    ref_delta = torch.cat([(ref["state"][k] - got["init"][k].float()).flatten() for k in ref["state"]])
    cosine = float(F.cosine_similarity(delta, ref_delta, dim=0))
    print(f"bf16 vs fp32 step: loss {got['loss'][0]:.5f} / {ref['loss'][0]:.5f}, grad norm "
          f"{got['grad_norm'][0]:.4f} / {ref['grad_norm'][0]:.4f}, update cosine {cosine:.4f}")
    assert cosine > 0.98
