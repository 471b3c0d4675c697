"""Long traces on the learner, the parts that need no process group: token-budget micro-batches
(``learner.max_tokens_per_micro_batch``: how a batch is cut into ranks and micro-batches) and
sequence parallelism's shares of a row and its refusals. That the steps equal the plain PyTorch
step is ``tests/e2e/test_equivalence.py`` (the ``tokens`` and ``sp2`` cases); the speed is
``benchmarks/long_context.py``."""
import random

import pytest
import torch

from r1ray.actors.batching import (
    _sequence_share,
    learner_shards,
    micro_batch_plan,
    pad_batch,
    shard_indices,
    step_micro_batches,
)
from r1ray.actors.packing import SftExample, sft_batch
from r1ray.actors.rollout import TrainSample
from r1ray.actors.sequence_parallel import SequenceGroup
from r1ray.controllers.config import load_recipe
from r1ray.controllers.config.schema import ConfigError


def _long_tail(n: int = 100, seed: int = 0) -> list[int]:
    """90% short rows, 10% at the maximum, shuffled."""
    rng = random.Random(seed)
    lengths = [rng.randint(50, 150) for _ in range(n * 9 // 10)] + [2000] * (n - n * 9 // 10)
    rng.shuffle(lengths)
    return lengths


def _padded(plan: list[list[int]], lengths: list[int]) -> int:
    return sum(len(mb) * max(lengths[i] for i in mb) for mb in plan)


def test_counted_micro_batches_keep_the_order():
    assert micro_batch_plan([5, 9, 1, 7, 3], 2) == [[0, 1], [2, 3], [4]]
    assert shard_indices([5, 9, 1, 7, 3], 2) == [[0, 1, 2], [3, 4]]
    assert step_micro_batches([5] * 16, 2, 3) == 6  # 8 per rank -> 3 micro-batches of at most 3, on 2 ranks


@pytest.mark.parametrize("budget", [2000, 4000, 8192])
def test_a_token_budget_bounds_every_micro_batch_and_loses_no_row(budget):
    lengths = _long_tail()
    plan = micro_batch_plan(lengths, 64, budget)
    assert sorted(i for mb in plan for i in mb) == list(range(len(lengths)))
    for mb in plan:
        assert len(mb) <= 64 and len(mb) * max(lengths[i] for i in mb) <= budget
    # The rows of a long tail no longer pay for the longest: the counted plan pads every
    # micro-batch that holds one long row to its length.
    counted = micro_batch_plan(lengths, 16)
    assert _padded(plan, lengths) < 0.5 * _padded(counted, lengths)
    assert _padded(plan, lengths) <= 1.5 * sum(lengths)


def test_a_row_longer_than_the_budget_goes_alone_and_the_row_cap_holds():
    assert micro_batch_plan([300, 10, 10, 10], 64, 100) == [[0], [1, 2, 3]]
    assert micro_batch_plan([10] * 5, 2, 10**6) == [[0, 1], [2, 3], [4]]


def test_ranks_are_balanced_by_tokens_not_by_count():
    lengths = _long_tail()
    parts = shard_indices(lengths, 4, 4000)
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(lengths)  # longest-first to the least loaded
    counted = [sum(lengths[i] for i in p) for p in shard_indices(lengths, 4)]
    assert max(loads) / min(loads) < max(counted) / min(counted)
    assert all(p == sorted(p) for p in parts)
    # every rank takes as many micro-batches as the busiest (bnpo's denominator)
    per_rank = [len(micro_batch_plan([lengths[i] for i in p], 64, 4000)) for p in parts]
    assert step_micro_batches(lengths, 4, 64, 4000) == 4 * max(per_rank)


def test_shards_hold_samples_and_packed_rows_by_their_tokens():
    samples = [TrainSample([1] * 10, [2] * n) for n in (5, 90, 5, 5)]
    assert [[len(s.completion_ids) for s in p] for p in learner_shards(samples, 2, 200)] == [[90], [5, 5, 5]]
    rows = [[SftExample([1] * 30, [1] * 30), SftExample([1] * 30, [1] * 30)], [SftExample([1] * 10, [1] * 10)]]
    assert learner_shards(rows, 2, 100) == [[rows[0]], [rows[1]]]


def test_a_budget_below_the_longest_row_is_refused_by_name():
    ok = load_recipe("configs/tiny-cpu.yaml", ["learner.max_tokens_per_micro_batch=4096"])
    assert ok.learner.max_tokens_per_micro_batch == 4096
    for value in ("0", "-5"):
        with pytest.raises(ConfigError, match="learner.max_tokens_per_micro_batch.*accepted"):
            load_recipe("configs/tiny-cpu.yaml", [f"learner.max_tokens_per_micro_batch={value}"])
    with pytest.raises(ConfigError, match=r"max_tokens_per_micro_batch.*sampling.max_new_tokens"):
        load_recipe("configs/tiny-cpu.yaml", ["learner.max_tokens_per_micro_batch=8", "sampling.max_new_tokens=64"])


def test_sequence_parallel_ranks_share_each_row_and_the_next_token_crosses_the_cut():
    """A rank holds a contiguous 1/n of the positions (the width padded to a multiple of n);
    the target of its last position is the first token of the next rank's share."""
    batch = pad_batch([[5, 6, 7], [5, 6]], [[8, 9, 10, 11], [12]], pad_id=0)  # widths 7 and 3, padded to 7
    shares = [_sequence_share(batch, SequenceGroup(None, 2, r)) for r in range(2)]
    ids, positions, targets, mask = (torch.cat([s[k] for s in shares], dim=1) for k in range(4))
    assert shares[0][0].shape == (2, 4) and shares[0][4] == 7
    assert ids[0].tolist() == [5, 6, 7, 8, 9, 10, 11, 0] and positions[1].tolist() == list(range(8))
    assert targets[0, :6].tolist() == [6, 7, 8, 9, 10, 11] and shares[0][2][0, 3].item() == 9  # crosses the cut
    assert mask[:, :6].long().tolist() == batch.completion_mask.tolist() and not mask[:, 6:].any()
    with pytest.raises(ValueError, match="packed rows"):
        _sequence_share(sft_batch([[SftExample([1, 2], [0, 1]), SftExample([3, 4], [0, 1])]], 0),
                        SequenceGroup(None, 2, 0))


def test_data_parallel_shares_are_given_to_whole_sequence_parallel_groups():
    samples = [TrainSample([1] * 4, [2] * n) for n in (3, 4, 5, 6)]
    parts = learner_shards(samples, 4, None, sequence_parallel=2)
    assert parts[0] == parts[1] == samples[:2] and parts[2] == parts[3] == samples[2:]


@pytest.mark.parametrize("sets, match", [
    (["learner.sequence_parallel_size=3"], "does not divide learner.num_ranks=2"),
    (["learner.sequence_parallel_size=0"], "accepted"),
    (["learner.sequence_parallel_size=2", "learner.lora.r=8"], "learner.lora"),
    (["learner.sequence_parallel_size=2", "placement.mode=colocate"], "placement.mode colocate"),
    (["learner.sequence_parallel_size=2", "sft.packing=true", "sft.max_seq_length=256"], "sft.packing"),
])
def test_what_does_not_go_with_sequence_parallelism_is_refused_by_name(sets, match):
    with pytest.raises(ConfigError, match=rf"learner.sequence_parallel_size.*{match}"):
        load_recipe("configs/tiny-cpu.yaml", sets)


def test_sequence_parallel_sizes_are_checked_against_a_local_models_heads(tiny_model):
    """The tiny model has 4 heads and 2 key/value heads: 4 ranks in a group fit, 8 do not."""
    common = [f"model.path={tiny_model}", "learner.num_ranks=8", "ray.num_cpus=16"]
    r = load_recipe("configs/tiny-cpu.yaml", [*common, "learner.sequence_parallel_size=4"])
    assert r.learner.data_parallel_size == 2
    with pytest.raises(ConfigError, match="4 attention heads and 2 key/value heads"):
        load_recipe("configs/tiny-cpu.yaml", [*common, "learner.sequence_parallel_size=8"])


# -- the learner's memory estimate (r1ray check) ---------------------------------------------------
QWEN_1_5B = {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
             "intermediate_size": 8960, "vocab_size": 151936, "tie_word_embeddings": False}  # R1-Distill-Qwen-1.5B
H100 = ["ray.num_cpus=64", "ray.num_gpus=8"]


def test_the_estimate_counts_what_autograd_keeps(tiny_model):
    """The parameter count is the model's; the activations per token and layer are within 10%
    of the tensors autograd saves for backward in a forward of the decoder (SDPA, fp32)."""
    from transformers import AutoModelForCausalLM

    from r1ray.controllers.config.memory import ModelShape

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").train()
    shape = ModelShape.of(model.config)
    assert shape.params == sum(p.numel() for p in model.parameters())
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved(tokens: int) -> int:
        storages = {}

        def keep(t):
            if t.untyped_storage().data_ptr() not in weights:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model.model(input_ids=torch.randint(3, 200, (1, tokens)))
        return sum(storages.values())

    per_token_layer = (saved(512) - saved(256)) / 256 / 4 / shape.layers
    assert per_token_layer == pytest.approx(shape.saved_per_token(), rel=0.1)


def test_the_16k_recipe_fits_an_h100_and_without_its_long_trace_settings_is_refused_by_name():
    from r1ray.controllers.config.memory import ModelShape, check_memory

    shape = ModelShape.of(QWEN_1_5B)
    assert shape.params == pytest.approx(1.777e9, rel=1e-3)
    recipe = load_recipe("configs/deepscaler-1.5b-16k-h100.yaml", H100)
    assert recipe.learner.sequence_parallel_size == 2 and recipe.sampling.max_new_tokens == 16384
    report, problem = check_memory(recipe, shape, ("grpo",))
    assert problem is None and 10 < report["total"] < 40, report
    plain = load_recipe("configs/deepscaler-1.5b-16k-h100.yaml",
                        [*H100, "learner.sequence_parallel_size=1", "learner.gradient_checkpointing=false"])
    report, problem = check_memory(plain, shape, ("grpo",))
    assert report["activations"] > 80  # 64k tokens x 28 layers kept whole: more than the GPU
    for key in ("learner.sequence_parallel_size", "learner.gradient_checkpointing",
                "learner.max_tokens_per_micro_batch", "learner.zero_stage"):
        assert key in problem
    # each setting acts where it should: SP halves the activations, ZeRO-3 partitions the weights
    half = check_memory(load_recipe("configs/deepscaler-1.5b-16k-h100.yaml",
                                    [*H100, "learner.gradient_checkpointing=false"]), shape, ("grpo",))[0]
    assert half["activations"] == pytest.approx(report["activations"] / 2)
    zero3 = check_memory(load_recipe("configs/deepscaler-1.5b-16k-h100.yaml", [*H100, "learner.zero_stage=3"]),
                         shape, ("grpo",))[0]
    assert zero3["weights"] == pytest.approx(report["weights"] / 4)


def test_r1ray_check_prints_each_ranks_memory(tiny_world):
    from r1ray.controllers.cli import learner_memory

    line, problem = learner_memory(load_recipe("configs/tiny-cpu.yaml", [f"model.tiny_dir={tiny_world}"]))
    assert line.startswith("about ") and "GiB" in line and "activations" in line and problem is None
