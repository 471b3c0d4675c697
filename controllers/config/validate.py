"""Every recipe key checked before any actor starts: an error names the key, the value and what is accepted."""
from __future__ import annotations

import os
from pathlib import Path

from ...actors.episodes import load_environment
from ...actors.generator import lora_rank_slot
from ...actors.scorer import check_specs
from ...actors.tools import schemas
from .recipe import EVAL_TASKS, EvalConfig, Recipe
from .schema import ConfigError


def _positive(key: str, value, allow_zero: bool = False):
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"config key '{key}': got {value!r}; accepted: a number {'>= 0' if allow_zero else '> 0'}")


def _check_sequence_parallel(r: Recipe, stage: str) -> None:
    """Ulysses groups of consecutive learner ranks; what does not go with them is refused."""
    lc, n = r.learner, r.learner.sequence_parallel_size
    _positive("learner.sequence_parallel_size", n)
    if n == 1:
        return
    key = f"config key 'learner.sequence_parallel_size': got {n}"
    if lc.num_ranks % n:
        raise ConfigError(f"{key}, which does not divide learner.num_ranks={lc.num_ranks}; accepted: a divisor of the "
                          "rank count (the data-parallel degree is num_ranks / sequence_parallel_size)")
    for on, what in [(lc.lora is not None, "learner.lora (LoRA adapters)"),
                     (r.colocated, "placement.mode colocate (a generator on the learner's module)"),
                     (r.sft.packing and (stage == "sft" or (stage == "grpo" and r.sft.steps > 0)),
                      "sft.packing (packed rows attend across examples without a mask)")]:
        if on:
            raise ConfigError(f"{key} with {what}; accepted: 1 with it, or turn it off")
    config = os.path.join(os.path.expanduser(r.model.path), "config.json")
    if os.path.isfile(config):  # a local model: its heads are known now (a hub model's at the learner's setup)
        import json

        with open(config) as f:
            cfg = json.load(f)
        cfg = cfg.get("text_config", cfg)
        heads, kv = cfg.get("num_attention_heads", n), cfg.get("num_key_value_heads", n)
        if heads % n or (kv % n and n % kv):
            raise ConfigError(f"{key}; the model has {heads} attention heads and {kv} key/value heads; accepted: a "
                              "size that divides the heads and divides or is a multiple of the key/value heads")


def _check_token_budget(r: Recipe, stage: str) -> None:
    """A token budget below the longest row would put that row alone in a micro-batch larger
    than the budget: refused, so that the budget is what a rank's memory is planned for."""
    budget = r.learner.max_tokens_per_micro_batch
    _positive("learner.max_tokens_per_micro_batch", budget)
    longest = [(r.rollout.budget(r.sampling.max_new_tokens), "a completion of sampling.max_new_tokens"
                if not r.rollout.multi_turn else "an episode of rollout.max_total_tokens")] if stage == "grpo" else []
    if stage in ("grpo", "sft") and r.sft.max_seq_length and (stage == "sft" or r.sft.steps):
        longest.append((r.sft.max_seq_length, "an SFT row of sft.max_seq_length"))
    for tokens, what in longest:
        if budget < tokens:
            raise ConfigError(f"config key 'learner.max_tokens_per_micro_batch': got {budget}, fewer than {what} "
                              f"({tokens} tokens); accepted: null (micro-batches counted in rows) or at least the "
                              "longest row a rank trains on (its prompt included)")


def validate(r: Recipe, available_cpus: float | None = None, available_gpus: float | None = None,
             resources: bool = True, stage: str = "grpo") -> None:
    """``stage``: what the recipe runs as: "grpo" (r1ray train: every actor group), "sft" (the
    learner ranks only) or "eval" (generators and scorers only); resources are checked for
    what that stage starts."""
    """Cross-field checks: everything that would otherwise fail minutes later inside an actor."""
    g, lc = r.grpo, r.learner
    for key, value in [("grpo.num_generations", g.num_generations), ("grpo.prompts_per_step", g.prompts_per_step),
                       ("learner.num_ranks", lc.num_ranks), ("learner.micro_batch_size", lc.micro_batch_size),
                       ("generator.num_actors", r.generator.num_actors), ("scorer.num_actors", r.scorer.num_actors),
                       ("reference.num_actors", r.reference.num_actors),
                       ("scorer.workers_per_actor", r.scorer.workers_per_actor), ("sampling.max_new_tokens", r.sampling.max_new_tokens),
                       ("sampling.temperature", r.sampling.temperature), ("learner.optim.lr", lc.optim.lr),
                       ("scorer.timeout_s", r.scorer.timeout_s), ("ray.call_timeout_s", r.ray.call_timeout_s),
                       ("ray.connect_timeout_s", r.ray.connect_timeout_s), ("ray.deadline_factor", r.ray.deadline_factor),
                       ("ray.deadline_min_s", r.ray.deadline_min_s), ("ray.heartbeat_s", r.ray.heartbeat_s),
                       ("ray.liveness_timeout_s", r.ray.liveness_timeout_s),
                       *([("scorer.memory_mb", r.scorer.memory_mb)] if isinstance(r.scorer.memory_mb, int) else [])]:
        _positive(key, value)
    for key, value in [("grpo.steps", g.steps), ("sft.steps", r.sft.steps), ("grpo.max_staleness", g.max_staleness),
                       ("grpo.groups_per_request", g.groups_per_request), ("grpo.rollout_managers", g.rollout_managers),
                       ("grpo.partial_rollout_tokens", g.partial_rollout_tokens), ("learner.loss.is_cap", lc.loss.is_cap),
                       ("learner.loss.kl_coef", lc.loss.kl_coef), ("eval.num_prompts", r.eval.num_prompts),
                       ("scorer.max_failed_steps", r.scorer.max_failed_steps),
                       ("scorer.max_timeouts_in_a_row", r.scorer.max_timeouts_in_a_row),
                       ("checkpoint.every_steps", r.checkpoint.every_steps)]:
        _positive(key, value, allow_zero=True)
    _positive("checkpoint.keep_last", r.checkpoint.keep_last)
    steps = r.logging.timeline_steps
    bad = [s for s in steps or () if not 1 <= s <= g.steps]
    if stage == "grpo" and bad:
        raise ConfigError(f"config key 'logging.timeline_steps': got {steps} (step {bad[0]}); accepted: GRPO steps "
                          f"from 1 to grpo.steps ({g.steps}), [] for none, or null for every step")
    _positive("storage.sync_every_s", r.storage.sync_every_s)
    validate_loss(lc.loss, r.sampling.max_new_tokens)
    if g.num_generations < 2:
        raise ConfigError(f"config key 'grpo.num_generations': got {g.num_generations}; accepted: an integer >= 2 "
                          "(group-normalised advantages need at least two completions per prompt)")
    if not 0 < r.sampling.top_p <= 1:
        raise ConfigError(f"config key 'sampling.top_p': got {r.sampling.top_p}; accepted: a number in (0, 1]")
    if lc.loss.temperature != r.sampling.temperature:
        raise ConfigError(f"config key 'learner.loss.temperature': got {lc.loss.temperature}; accepted: the value of "
                          f"sampling.temperature ({r.sampling.temperature}), because the learner must score each token "
                          "at the temperature the generator sampled it with")
    _check_sequence_parallel(r, stage)
    _check_teacher(r)
    _check_judges(r)
    batch = g.prompts_per_step * g.num_generations
    if batch % lc.data_parallel_size:
        raise ConfigError(f"config keys 'grpo.prompts_per_step' x 'grpo.num_generations' = {batch} samples per step "
                          f"do not divide over {lc.data_parallel_size} data-parallel shares (learner.num_ranks="
                          f"{lc.num_ranks} / learner.sequence_parallel_size={lc.sequence_parallel_size}); accepted: a "
                          "batch divisible by that count")
    if r.sft.stop_at_pass_rate is not None:
        if not 0 < r.sft.stop_at_pass_rate <= 1:
            raise ConfigError(f"config key 'sft.stop_at_pass_rate': got {r.sft.stop_at_pass_rate}; accepted: a number in "
                              "(0, 1] or null")
        for key, value in [("sft.probe_every", r.sft.probe_every), ("sft.probe_prompts", r.sft.probe_prompts)]:
            _positive(key, value)
        _positive("sft.probe_from", r.sft.probe_from, allow_zero=True)
    if r.sft.packing and not r.sft.max_seq_length:
        raise ConfigError("config key 'sft.packing': got true with sft.max_seq_length null; accepted: a max_seq_length "
                          "(the length of a packed row), or packing false")
    if r.sft.max_seq_length is not None:
        _positive("sft.max_seq_length", r.sft.max_seq_length)
    if not 0 <= r.sft.min_lr_ratio <= 1:
        raise ConfigError(f"config key 'sft.min_lr_ratio': got {r.sft.min_lr_ratio}; accepted: a number in [0, 1]")
    _positive("sft.eval_every", r.sft.eval_every, allow_zero=True)
    if r.sft.epochs is not None:
        _positive("sft.epochs", r.sft.epochs)
    _positive("sft.eval_examples", r.sft.eval_examples)
    if lc.max_tokens_per_micro_batch is not None:
        _check_token_budget(r, stage)
    if r.colocated and stage == "grpo":
        _check_colocate(r)
    if r.reference.adapters_off and lc.lora is None:
        raise ConfigError("config key 'reference.adapters_off': got true with learner.lora null; accepted: null or "
                          "false, or LoRA adapters (learner.lora) to switch off")
    if lc.lora is not None:
        if lc.zero_stage == 3:
            raise ConfigError("config key 'learner.lora': got adapters with learner.zero_stage 3; accepted: zero_stage "
                              "0, 1 or 2 (merges, adapter exports and the adapters-off reference need the whole "
                              "weights on every rank)")
        if stage == "grpo" and r.generator.backend == "vllm":
            if r.sft.steps:
                raise ConfigError(f"config key 'sft.steps': got {r.sft.steps} with learner.lora and generator.backend "
                                  "'vllm': the warm-up's adapters are folded into the base, which vLLM's LoRA cannot "
                                  "take in flight; accepted: sft.steps 0 with the warm-up as an r1ray sft stage "
                                  "before (configs/tiny-staged.yaml), or generator.backend hf")
            try:
                lora_rank_slot(lc.lora.r)
            except ValueError as e:
                raise ConfigError(f"config key 'learner.lora.r': {e}") from None
        for key, value in [("learner.lora.r", lc.lora.r), ("learner.lora.alpha", lc.lora.alpha)]:
            _positive(key, value)
        if not 0 <= lc.lora.dropout < 1:
            raise ConfigError(f"config key 'learner.lora.dropout': got {lc.lora.dropout}; accepted: a number in [0, 1)")
    if r.sft.steps and r.sft.batch_size % lc.num_ranks:
        raise ConfigError(f"config key 'sft.batch_size': got {r.sft.batch_size}; accepted: a multiple of "
                          f"learner.num_ranks={lc.num_ranks}")
    if lc.dtype == "bfloat16" and lc.zero_stage == 0:
        raise ConfigError("config key 'learner.dtype': 'bfloat16' needs learner.zero_stage >= 1 under DeepSpeed; "
                          "accepted: zero_stage 1, 2 or 3 with bfloat16, or dtype 'float32'")
    if r.sampling.max_new_tokens >= r.generator.max_model_len:
        raise ConfigError(f"config key 'sampling.max_new_tokens': got {r.sampling.max_new_tokens}; accepted: fewer than "
                          f"generator.max_model_len={r.generator.max_model_len}")
    if r.eval.num_prompts and r.eval.reward not in {s.name for s in r.rewards} | {"accuracy"}:
        raise ConfigError(f"config key 'eval.reward': got {r.eval.reward!r}; accepted: 'accuracy' or one of the "
                          f"configured rewards ({', '.join(s.name for s in r.rewards)})")
    validate_eval(r.eval, r.generator.max_model_len, r.data.test_split)
    if not r.rewards:
        raise ConfigError("config key 'rewards': got an empty list; accepted: at least one reward function")
    try:
        check_specs(r.rewards)
    except ValueError as e:
        raise ConfigError(f"config key '{str(e).split(' ', 1)[0]}': {str(e).split(' ', 1)[1]}") from None
    gen = r.generator
    if g.rollout_managers:
        _rollout_managers(r)
    if not 0 <= g.completions_per_request <= g.num_generations:
        raise ConfigError(f"config key 'grpo.completions_per_request': got {g.completions_per_request}; accepted: 0 (the "
                          f"whole group in one request) to num_generations ({g.num_generations})")
    if g.completions_per_request and gen.backend != "vllm":
        raise ConfigError(f"config key 'grpo.completions_per_request': got {g.completions_per_request} with generator "
                          f"backend {gen.backend!r}; accepted: 0, or backend 'vllm' (hf generators batch a whole call, "
                          "so parts of a group would run one after another)")
    for key, value in [("generator.bucket_mb", gen.bucket_mb), ("generator.max_requests", gen.max_requests),
                       ("generator.tensor_parallel_size", gen.tensor_parallel_size),
                       ("ray.placement_timeout_s", r.ray.placement_timeout_s),
                       ("learner.cpus_per_rank", lc.cpus_per_rank), ("generator.cpus_per_actor", gen.cpus_per_actor),
                       ("scorer.cpus_per_actor", r.scorer.cpus_per_actor), ("reference.cpus", r.reference.cpus)]:
        _positive(key, value)
    for key, value in [("generator.max_num_seqs", gen.max_num_seqs),
                       ("generator.max_num_batched_tokens", gen.max_num_batched_tokens)]:
        if value is not None:
            _positive(key, value)
    if gen.max_num_seqs and gen.max_num_batched_tokens and gen.max_num_batched_tokens < gen.max_num_seqs:
        raise ConfigError(f"config key 'generator.max_num_batched_tokens': got {gen.max_num_batched_tokens} with "
                          f"max_num_seqs {gen.max_num_seqs}; accepted: at least max_num_seqs (vLLM schedules one "
                          "token of every running sequence per step)")
    for key, value in [("learner.gpus_per_rank", lc.gpus_per_rank), ("generator.gpus_per_actor", gen.gpus_per_actor),
                       ("reference.gpus", r.reference.gpus)]:
        if value < 0 or value != int(value):
            raise ConfigError(f"config key '{key}': got {value!r}; accepted: 0 or a whole number of GPUs (to share a "
                              "learner rank's GPU with a vLLM generator that sleeps while it trains: placement.mode "
                              "colocate)")
    if gen.tensor_parallel_size > 1 and gen.backend != "vllm":
        raise ConfigError(f"config key 'generator.tensor_parallel_size': got {gen.tensor_parallel_size} with backend "
                          f"{gen.backend!r}; accepted: 1, or backend 'vllm' (tensor parallelism is vLLM's)")
    if gen.tensor_parallel_size > 1 and gen.gpus_per_actor != gen.tensor_parallel_size:
        raise ConfigError(f"config key 'generator.gpus_per_actor': got {gen.gpus_per_actor:g} with tensor_parallel_size "
                          f"{gen.tensor_parallel_size}; accepted: {gen.tensor_parallel_size} (each generator is a bundle "
                          "of tensor_parallel_size GPUs on one node)")
    if gen.backend == "vllm" and gen.gpus_per_actor > gen.tensor_parallel_size:
        raise ConfigError(f"config key 'generator.gpus_per_actor': got {gen.gpus_per_actor:g} with tensor_parallel_size "
                          f"{gen.tensor_parallel_size}; accepted: at most {gen.tensor_parallel_size} (vLLM would leave "
                          f"{gen.gpus_per_actor - gen.tensor_parallel_size:g} of them idle: raise "
                          "generator.tensor_parallel_size instead)")
    lo, hi = gen.actor_range()
    if not 1 <= lo <= gen.num_actors <= hi:
        raise ConfigError(f"config keys 'generator.min_actors' / 'generator.max_actors': got {gen.min_actors!r} / "
                          f"{gen.max_actors!r} with num_actors {gen.num_actors}; accepted: 1 <= min_actors <= "
                          "num_actors <= max_actors (null: num_actors)")
    validate_rollout(r)
    if gen.backend == "vllm" and g.partial_rollout_tokens:
        raise ConfigError(f"config key 'grpo.partial_rollout_tokens': got {g.partial_rollout_tokens} with generator.backend "
                          "'vllm'; accepted: 0 (vLLM continues requests in flight under new weights itself: "
                          "generator.pause_mode 'keep'), or generator.backend 'hf'")
    if gen.backend == "vllm" and gen.gpus_per_actor > 0 and not lc.gpus_per_rank and stage == "grpo":
        raise ConfigError("config key 'learner.gpus_per_rank': got 0 with vLLM generators on GPUs; accepted: > 0 "
                          "(weights go from learner rank 0's GPU to the generators' over NCCL)")
    if stage == "distill":
        validate_distill(r, available_cpus, available_gpus, resources)
    elif resources and stage != "eval":  # an evaluation's placement is checked once Ray is up
        check_resources(r, available_cpus, available_gpus, learners_only=stage == "sft")


def validate_distill(r: Recipe, cpus: float | None = None, gpus: float | None = None, resources: bool = True) -> None:
    """``distill``: one teacher (a URL or servers to start), a template that only uses
    ``{{ instruction }}``, sane sampling and client knobs, and servers that fit the cluster."""
    import re

    import jinja2
    from jinja2 import meta

    d = r.distill
    if (d.base_url is None) == (d.serve is None):
        raise ConfigError(f"config keys 'distill.base_url' / 'distill.serve': got {d.base_url!r} / "
                          f"{'a server config' if d.serve else None}; accepted: exactly one of them: the URL of an "
                          "OpenAI-compatible endpoint (e.g. https://api.deepseek.com/v1), or serve: {replicas: N} to "
                          "start vLLM servers of distill.model (default model.path) here")
    if d.base_url is not None and not re.match(r"^https?://[^/\s]+", d.base_url):
        raise ConfigError(f"config key 'distill.base_url': got {d.base_url!r}; accepted: an http:// or https:// URL of an "
                          "OpenAI-compatible API (ending in /v1 for most)")
    if d.base_url is not None and not d.model:
        raise ConfigError("config key 'distill.model': got null with distill.base_url; accepted: the model name the "
                          "endpoint serves (e.g. deepseek-reasoner)")
    if d.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", d.api_key_env):
        raise ConfigError(f"config key 'distill.api_key_env': got {d.api_key_env!r}; accepted: the NAME of an "
                          "environment variable that holds the key (e.g. DEEPSEEK_API_KEY), never the key itself")
    try:
        names = meta.find_undeclared_variables(jinja2.Environment().parse(d.prompt_template))
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"config key 'distill.prompt_template': not a valid Jinja template ({e}); accepted: text with "
                          "{{ instruction }} where the prompt goes") from None
    if names != {"instruction"}:
        raise ConfigError(f"config key 'distill.prompt_template': uses {sorted(names) or 'no variable'}; accepted: a "
                          "template with {{ instruction }} (the prompt column's text) and no other variable")
    for key, value in [("distill.top_p", d.top_p), ("distill.max_new_tokens", d.max_new_tokens),
                       ("distill.num_generations", d.num_generations), ("distill.input_batch_size", d.input_batch_size),
                       ("distill.client_replicas", d.client_replicas), ("distill.timeout", d.timeout),
                       *([("distill.max_rows", d.max_rows)] if d.max_rows is not None else []),
                       *([("distill.max_concurrency", d.max_concurrency)] if d.max_concurrency is not None else []),
                       *([("distill.requests_per_second", d.requests_per_second)]
                         if d.requests_per_second is not None else [])]:
        _positive(key, value)
    for key, value in [("distill.temperature", d.temperature), ("distill.retries", d.retries),
                       ("distill.test_size", d.test_size)]:
        _positive(key, value, allow_zero=True)
    if d.top_p > 1:
        raise ConfigError(f"config key 'distill.top_p': got {d.top_p}; accepted: a number in (0, 1]")
    if d.push_to_hub is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", d.push_to_hub):
        raise ConfigError(f"config key 'distill.push_to_hub': got {d.push_to_hub!r}; accepted: a hub dataset name "
                          "'owner/name', or null")
    s = d.serve
    if s is None:
        return
    for key, value in [("distill.serve.replicas", s.replicas), ("distill.serve.tensor_parallel_size", s.tensor_parallel_size),
                       ("distill.serve.startup_timeout_s", s.startup_timeout_s),
                       ("distill.serve.cpus_per_replica", s.cpus_per_replica)]:
        _positive(key, value)
    _positive("distill.serve.gpus_per_replica", s.gpus_per_replica, allow_zero=True)
    if s.gpus_per_replica and s.gpus_per_replica != s.tensor_parallel_size:
        raise ConfigError(f"config key 'distill.serve.gpus_per_replica': got {s.gpus_per_replica:g} with "
                          f"tensor_parallel_size {s.tensor_parallel_size}; accepted: {s.tensor_parallel_size} (a server "
                          "shards the model over exactly its GPUs), or 0 for a CPU server")
    if not s.gpus_per_replica and s.tensor_parallel_size > 1:
        raise ConfigError(f"config key 'distill.serve.tensor_parallel_size': got {s.tensor_parallel_size} on CPU "
                          "(gpus_per_replica 0); accepted: 1, or gpus_per_replica = tensor_parallel_size")
    if not resources:
        return
    cpus = cpus if cpus is not None else (r.ray.num_cpus if r.ray.num_cpus is not None else (os.cpu_count() or 1))
    gpus = gpus if gpus is not None else (r.ray.num_gpus if r.ray.num_gpus is not None else _local_gpus())
    if s.replicas * s.gpus_per_replica > gpus:
        raise ConfigError(f"config key 'distill.serve.replicas': {s.replicas} servers x {s.gpus_per_replica:g} GPUs need "
                          f"{s.replicas * s.gpus_per_replica:g} GPUs but {gpus:g} are available; accepted: "
                          + (f"at most {int(gpus // s.gpus_per_replica)} replicas" if gpus else
                             "gpus_per_replica 0 (vLLM on CPU) or a cluster with GPUs"))
    if s.replicas * s.cpus_per_replica > cpus:
        raise ConfigError(f"config key 'distill.serve.replicas': {s.replicas} servers x {s.cpus_per_replica:g} CPUs need "
                          f"{s.replicas * s.cpus_per_replica:g} CPUs but {cpus:g} are available; accepted: fewer replicas "
                          "or a smaller distill.serve.cpus_per_replica")


def validate_rollout(r: Recipe) -> None:
    """``rollout``: tools that load and describe themselves, turn and token limits that fit."""
    ro = r.rollout
    for key, value in [("rollout.max_turns", ro.max_turns), ("rollout.tool_timeout_s", ro.tool_timeout_s),
                       ("rollout.tool_workers", ro.tool_workers), ("rollout.max_tool_output_chars", ro.max_tool_output_chars),
                       *([("rollout.max_total_tokens", ro.max_total_tokens)] if ro.max_total_tokens is not None else [])]:
        _positive(key, value)
    if not ro.multi_turn:
        if ro.max_turns > 1:
            raise ConfigError(f"config key 'rollout.max_turns': got {ro.max_turns} with no rollout.tools; accepted: 1, "
                              "or tools (or an environment) for the policy to meet between turns")
        return
    try:
        schemas(ro.tools)
    except ValueError as e:
        raise ConfigError(f"config key 'rollout.tools': {e}") from None
    if ro.environment:
        try:
            load_environment(ro.environment)
        except ValueError as e:
            raise ConfigError(f"config key 'rollout.environment': {e}; accepted: 'package.module:Class'") from None
    what = "rollout.tools" if ro.tools else "rollout.environment"
    if ro.max_turns < 2:
        raise ConfigError(f"config key 'rollout.max_turns': got {ro.max_turns} with {what}; accepted: >= 2 "
                          "(a turn that calls a tool or meets the environment, then one that reads its answer)")
    budget = ro.budget(r.sampling.max_new_tokens)
    if budget >= r.generator.max_model_len:
        raise ConfigError(f"config key 'rollout.max_total_tokens': got {budget}; accepted: fewer than "
                          f"generator.max_model_len={r.generator.max_model_len}")


def validate_eval(e: EvalConfig, max_model_len: int, test_split: str) -> None:
    """``eval.tasks`` and how they are sampled, before anything loads."""
    _positive("eval.every_steps", e.every_steps, allow_zero=True)
    _positive("eval.sampling.temperature", e.sampling.temperature, allow_zero=True)
    if not 0 < e.sampling.top_p <= 1:
        raise ConfigError(f"config key 'eval.sampling.top_p': got {e.sampling.top_p}; accepted: a number in (0, 1]")
    if e.sampling.max_new_tokens is not None and not 0 < e.sampling.max_new_tokens < max_model_len:
        raise ConfigError(f"config key 'eval.sampling.max_new_tokens': got {e.sampling.max_new_tokens}; accepted: null "
                          f"(the rest of generator.max_model_len after each prompt) or 1 .. {max_model_len - 1}")
    for i, k in enumerate(e.k or []):
        _positive(f"eval.k[{i}]", k)
    if e.every_steps and not e.tasks:
        raise ConfigError(f"config key 'eval.every_steps': got {e.every_steps} with no eval.tasks; accepted: 0, or "
                          "tasks to evaluate (e.g. eval.tasks: [{task: heldout}])")
    names = set()
    for i, t in enumerate(e.tasks):
        key = f"eval.tasks[{i}]"
        if t.task not in EVAL_TASKS:
            raise ConfigError(f"config key '{key}.task': got {t.task!r}; accepted: one of {', '.join(EVAL_TASKS)}")
        if t.task == "generic" and not t.path:
            raise ConfigError(f"config key '{key}.path': the generic task needs a dataset; accepted: a local jsonl, "
                              "json, parquet or csv file, a save_to_disk folder, or a hub dataset name")
        if t.task == "heldout" and (t.path or t.subset):
            raise ConfigError(f"config key '{key}.path': the heldout task reads the recipe's data ({test_split!r} "
                              "split); accepted: no path (use task: generic for another dataset)")
        for field_name in ("num_samples", "max_problems"):
            if getattr(t, field_name) is not None:
                _positive(f"{key}.{field_name}", getattr(t, field_name))
        name = t.name or t.task
        if name in names:
            raise ConfigError(f"config key '{key}.name': {name!r} is used by two tasks; accepted: a name per task "
                              "(its reports and metrics are named after it)")
        names.add(name)


def validate_loss(lc, max_new_tokens: int) -> None:
    """The GRPO-family knobs of ``learner.loss`` that the schema's types cannot check alone."""
    _positive("learner.loss.entropy_coef", lc.entropy_coef, allow_zero=True)
    for key, value in [("learner.loss.num_iterations", lc.num_iterations),
                       ("learner.loss.sapo_temperature_pos", lc.sapo_temperature_pos),
                       ("learner.loss.sapo_temperature_neg", lc.sapo_temperature_neg)]:
        _positive(key, value)
    if lc.loss_type == "cispo" and lc.clip_eps_high < 1:
        raise ConfigError(f"config key 'learner.loss.clip_eps_high': got {lc.clip_eps_high} with loss_type 'cispo'; "
                          "accepted: a number >= 1, because for cispo it caps the ratio itself (TRL epsilon_high; "
                          "ScaleRL recommends 5.0)")
    if lc.delta is not None and (lc.loss_type in ("cispo", "sapo") or lc.delta <= 1 + lc.clip_eps_high):
        raise ConfigError(f"config key 'learner.loss.delta': got {lc.delta} with loss_type {lc.loss_type!r}; accepted: "
                          f"null, or a number > 1 + clip_eps_high = {1 + lc.clip_eps_high:g} with loss_type grpo, "
                          "bnpo, dr_grpo or dapo (the dual clip of the clipped surrogate)")
    if lc.num_iterations > 1 and lc.off_policy != "none":
        raise ConfigError(f"config key 'learner.loss.num_iterations': got {lc.num_iterations} with off_policy "
                          f"{lc.off_policy!r}; accepted: 1, or off_policy 'none' (iterations 2.. use the learner's "
                          "own log-probs as the old policy)")
    if lc.teacher_kl_coef < 0:
        raise ConfigError(f"config key 'learner.loss.teacher_kl_coef': got {lc.teacher_kl_coef}; accepted: a number "
                          ">= 0 (0: no teacher term)")
    if lc.kl_max is not None and lc.kl_max <= 0:
        raise ConfigError(f"config key 'learner.loss.kl_max': got {lc.kl_max:g}; accepted: null (uncapped, as TRL) "
                          "or a number > 0 (each token's KL estimate clamped to [-kl_max, kl_max]; veRL uses 10)")
    if lc.kl_in_reward and not lc.kl_coef:
        raise ConfigError("config key 'learner.loss.kl_in_reward': got True with kl_coef 0; accepted: false, or a "
                          "kl_coef > 0 (the KL weight in the reward)")
    if lc.max_completion_length is not None and lc.max_completion_length < max_new_tokens:
        raise ConfigError(f"config key 'learner.loss.max_completion_length': got {lc.max_completion_length}; "
                          f"accepted: null (meaning sampling.max_new_tokens={max_new_tokens}) or an integer >= it "
                          "(dr_grpo divides by sequences x this constant)")


def check_resources(r: Recipe, cpus: float | None = None, gpus: float | None = None, learners_only: bool = False) -> None:
    """Reject placements that could never be scheduled (Ray would wait forever on them).
    ``learners_only``: r1ray sft, which starts the learner ranks and nothing else."""
    if cpus is None:
        cpus = r.ray.num_cpus if r.ray.num_cpus is not None else (os.cpu_count() or 1)
    if gpus is None:
        gpus = r.ray.num_gpus if r.ray.num_gpus is not None else _local_gpus()
    lc = r.learner
    need_learner_cpus = lc.num_ranks * lc.cpus_per_rank
    if need_learner_cpus > cpus:
        raise ConfigError(f"config key 'learner.num_ranks': got {lc.num_ranks} ranks x {lc.cpus_per_rank} CPUs = "
                          f"{need_learner_cpus} CPUs, but only {cpus} are available; accepted: at most "
                          f"{int(cpus // lc.cpus_per_rank) if lc.cpus_per_rank else 'any'} ranks of {lc.cpus_per_rank:g} CPUs "
                          "(or a cluster with more CPUs)")
    own = 0 if r.hosts_generator else r.generator.num_actors  # colocated hf: the generator is in learner rank 0
    # colocated vLLM: each generator shares a learner rank's GPU (and adds its CPUs to the rank's bundle)
    need_gpus = lc.num_ranks * lc.gpus_per_rank + (0 if r.colocated else own * r.generator.gpus_per_actor)
    reference_cpus = r.reference.num_actors * r.reference.cpus if r.reference_actor else 0
    if r.reference_actor:
        need_gpus += r.reference.num_actors * r.reference.gpus
    teacher_cpus = r.teacher.num_actors * r.teacher.cpus if r.teacher_actor else 0
    if r.teacher_actor:
        need_gpus += r.teacher.num_actors * r.teacher.gpus
    judge_cpus = sum(s.replicas * s.cpus_per_replica for _, s in r.judge_servers)
    need_gpus += sum(s.replicas * s.gpus_per_replica for _, s in r.judge_servers)
    if learners_only:
        need_gpus = lc.num_ranks * lc.gpus_per_rank
    if need_gpus > gpus:
        ref_gpus = r.reference.num_actors * r.reference.gpus if r.reference_actor else 0
        raise ConfigError(f"config keys 'learner.gpus_per_rank' / 'generator.gpus_per_actor' / 'reference.num_actors': "
                          f"the recipe needs {need_gpus:g} GPUs (learner {lc.num_ranks * lc.gpus_per_rank:g}, reference "
                          f"{ref_gpus:g}, generators and others {need_gpus - lc.num_ranks * lc.gpus_per_rank - ref_gpus:g}) "
                          f"but {gpus:g} are available; accepted: at most {gpus:g} GPUs in all")
    if learners_only:
        if need_gpus > gpus:
            raise ConfigError(f"config key 'learner.gpus_per_rank': the learner ranks need {need_gpus} GPUs but {gpus} "
                              f"are available; accepted: at most {gpus} GPUs in all")
        return
    total = (need_learner_cpus + own * r.generator.cpus_per_actor
             + r.scorer.num_actors * r.scorer.cpus_per_actor + reference_cpus
             + teacher_cpus + judge_cpus)
    if total > cpus:
        raise ConfigError(f"config: the actors ask for {total:g} CPUs in all (learner {need_learner_cpus:g}, generator "
                          f"{own * r.generator.cpus_per_actor:g}, scorer "
                          f"{r.scorer.num_actors * r.scorer.cpus_per_actor:g}, reference "
                          f"{reference_cpus:g}, teacher {teacher_cpus:g}, judge servers "
                          f"{judge_cpus:g}) but {cpus} "
                          "are available; "
                          "accepted: lower *.cpus_per_* or the actor counts")


def _check_teacher(r: Recipe) -> None:
    """``teacher`` and the two ways of learning from it (on-policy distillation)."""
    g, lc, tc = r.grpo, r.learner.loss, r.teacher
    wants = ("grpo.advantage_estimator", "on_policy_distill") if g.advantage_estimator == "on_policy_distill" else \
        ("learner.loss.teacher_kl_coef", lc.teacher_kl_coef) if lc.teacher_kl_coef else None
    if wants and tc.model is None:
        raise ConfigError(f"config key '{wants[0]}': got {wants[1]!r} without a teacher; accepted: teacher.model (a hub "
                          "name or a local HF folder with the student's tokenizer), or "
                          + ("another advantage_estimator" if wants[0].startswith("grpo") else "teacher_kl_coef 0"))
    if g.advantage_estimator == "on_policy_distill" and (lc.teacher_kl_coef or lc.kl_in_reward):
        key = "teacher_kl_coef" if lc.teacher_kl_coef else "kl_in_reward"
        raise ConfigError(f"config key 'learner.loss.{key}': got {getattr(lc, key)!r} with advantage_estimator "
                          "on_policy_distill; accepted: 0 / false (the advantage is the teacher's term alone; the "
                          "reference KL can stay in the loss with kl_coef)")
    if g.advantage_estimator == "on_policy_distill" and g.dynamic_sampling:
        raise ConfigError("config key 'grpo.dynamic_sampling': got True with advantage_estimator on_policy_distill; "
                          "accepted: false (it drops groups whose rewards are all equal, and the distillation "
                          "advantage does not use the rewards: such groups still carry the teacher's signal)")
    if not 0 <= g.distill_discount <= 1:
        raise ConfigError(f"config key 'grpo.distill_discount': got {g.distill_discount}; accepted: a number in [0, 1] "
                          "(0: each token's own reverse KL)")
    if g.distill_kl_clip is not None and not g.distill_kl_clip > 0:
        raise ConfigError(f"config key 'grpo.distill_kl_clip': got {g.distill_kl_clip}; accepted: a number > 0 (each "
                          "token's reverse KL to the teacher cut to [-c, c]) or null (uncut)")
    if g.distill_discount and g.advantage_estimator != "on_policy_distill":  # settings that would do nothing
        raise ConfigError(f"config key 'grpo.distill_discount': got {g.distill_discount} with advantage_estimator "
                          f"{g.advantage_estimator!r}; accepted: 0 (it discounts on_policy_distill's advantage only)")
    if g.distill_kl_clip is not None and not wants:
        raise ConfigError(f"config key 'grpo.distill_kl_clip': got {g.distill_kl_clip} with no teacher term; accepted: "
                          "null, or a teacher term to cut (advantage_estimator on_policy_distill, or "
                          "learner.loss.teacher_kl_coef > 0)")
    if tc.model is not None:
        _positive("teacher.num_actors", tc.num_actors)
        _positive("teacher.micro_batch_size", tc.micro_batch_size)
        _positive("teacher.cpus", tc.cpus, allow_zero=True)
        _positive("teacher.gpus", tc.gpus, allow_zero=True)


def _check_judges(r: Recipe) -> None:
    """``judge`` rewards: the servers r1ray starts for ``serve``, and the key in the environment
    (read here, so a missing one stops the run before any actor starts)."""
    import dataclasses

    from ...actors.server import ServerConfig

    accepted = ", ".join(f.name for f in dataclasses.fields(ServerConfig))
    for i, s in enumerate(r.rewards):
        if s.name != "judge":
            continue
        serve, env = s.params.get("serve"), s.params.get("api_key_env")
        if serve is not None and not isinstance(serve, dict):
            raise ConfigError(f"config key 'rewards[{i}].params.serve': got {serve!r}; accepted: a mapping of vLLM "
                              f"server settings ({accepted})")
        if serve is not None:
            unknown = sorted(set(serve) - {f.name for f in dataclasses.fields(ServerConfig)})
            if unknown:
                raise ConfigError(f"config key 'rewards[{i}].params.serve': got {', '.join(map(repr, unknown))}; "
                                  f"accepted: {accepted}")
            cfg = ServerConfig(**serve)
            if isinstance(cfg.replicas, bool) or not isinstance(cfg.replicas, int) or cfg.replicas < 1:
                raise ConfigError(f"config key 'rewards[{i}].params.serve.replicas': got {cfg.replicas!r}; accepted: "
                                  "an integer >= 1")
            _positive(f"rewards[{i}].params.serve.cpus_per_replica", cfg.cpus_per_replica)
            _positive(f"rewards[{i}].params.serve.gpus_per_replica", cfg.gpus_per_replica, allow_zero=True)
            model = cfg.model
            if isinstance(model, str) and model != "tiny" and _missing_folder(model):
                raise ConfigError(f"config key 'rewards[{i}].params.serve.model': {model!r} is not a folder here; "
                                  "accepted: a local HF folder, a hub name, or null (the policy's model)")
        if env is not None:
            env_secret(env, f"rewards[{i}].params.api_key_env", "the judge's key")


def env_secret(name: str, key: str, what: str = "your key"):
    """The value of the environment variable ``name`` as a pydantic SecretStr (printed as
    **********); ConfigError naming the config ``key`` that names the variable when it is unset."""
    from pydantic import SecretStr

    value = os.environ.get(name, "").strip()
    if not value:
        raise ConfigError(f"config key '{key}': the environment variable {name} is not set (or empty); accepted: "
                          f"export {name}=<{what}> before running, or api_key_env null for an endpoint without a key")
    return SecretStr(value)


def judge_keys(r: Recipe) -> dict:
    """The judges' API keys by the environment variable that holds each: what the scorer actors
    are given."""
    return {s.params["api_key_env"]: env_secret(s.params["api_key_env"], f"rewards[{i}].params.api_key_env")
            for i, s in enumerate(r.rewards) if s.name == "judge" and s.params.get("api_key_env") is not None}


def _missing_folder(model: str) -> bool:
    """A model named by a path (a hub name is ``owner/name``) that is not a folder here."""
    return (model.startswith(("/", ".", "~")) or model.count("/") > 1) and not Path(model).expanduser().is_dir()


def check_teacher_tokenizer(r: Recipe, student) -> None:
    """The teacher scores the student's token ids: its tokenizer must be the student's (the same
    vocabulary, ids and special tokens). Refused by name before any actor starts."""
    if r.teacher.model is None:
        return
    from transformers import AutoTokenizer

    model = r.teacher.model
    if _missing_folder(model):
        raise ConfigError(f"config key 'teacher.model': {model!r} is not a folder here; accepted: a local HF "
                          "folder (configs/tiny-opd.yaml's teacher is what `make demo` writes: run it first) or "
                          "a hub name")
    try:
        teacher = AutoTokenizer.from_pretrained(r.teacher.model)
    except Exception as e:  # noqa: BLE001 - its own message says what is missing
        raise ConfigError(f"config key 'teacher.model': {r.teacher.model!r} has no tokenizer that loads "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); accepted: a hub name or a local HF "
                          "folder with the student's tokenizer") from None
    a, b = student.get_vocab(), teacher.get_vocab()
    differ = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])
    specials = [(name, getattr(student, name), getattr(teacher, name)) for name in ("eos_token_id", "pad_token_id")
                if getattr(student, name) != getattr(teacher, name)]
    if differ or specials:
        what = (f"{len(a)} vs {len(b)} tokens; first difference: token {differ[0][0]!r} id {differ[0][1]}"
                if differ else f"{specials[0][0]} {specials[0][1]} vs {specials[0][2]}")
        raise ConfigError(f"config key 'teacher.model': {r.teacher.model!r} has another tokenizer than the student "
                          f"({what}); accepted: a teacher with the student's tokenizer (the teacher scores the "
                          "student's token ids)")


def _check_colocate(r: Recipe) -> None:
    """``placement.mode: colocate``: what cannot share the learner's process and module."""
    gen, lc = r.generator, r.learner
    if r.grpo.max_staleness:
        raise ConfigError(f"config key 'grpo.max_staleness': got {r.grpo.max_staleness} with placement.mode colocate; "
                          "accepted: 0 (a colocated generator and the learner take turns on the same weights: nothing "
                          "is generated while they train), or placement.mode split")
    if r.hosts_generator and (gen.actor_range() != (1, 1) or gen.num_actors != 1):
        raise ConfigError(f"config key 'generator.num_actors': got {gen.num_actors} (min_actors {gen.min_actors}, "
                          f"max_actors {gen.max_actors}) with placement.mode colocate and backend hf; accepted: 1 and "
                          "no elastic range (the one generator lives in learner rank 0's process)")
    if gen.backend == "vllm" and (gen.actor_range() != (gen.num_actors, gen.num_actors)
                                  or gen.num_actors > lc.num_ranks):
        raise ConfigError(f"config key 'generator.num_actors': got {gen.num_actors} (min_actors {gen.min_actors}, "
                          f"max_actors {gen.max_actors}) with placement.mode colocate and {lc.num_ranks} learner ranks; "
                          f"accepted: 1 to {lc.num_ranks} and no elastic range (generator i shares learner rank i's "
                          "bundle: its CPUs and GPU)")
    if gen.backend == "vllm" and (lc.gpus_per_rank or gen.gpus_per_actor) and (
            lc.gpus_per_rank, gen.gpus_per_actor, gen.tensor_parallel_size) != (1, 1, 1):
        raise ConfigError(f"config keys 'learner.gpus_per_rank' / 'generator.gpus_per_actor' / "
                          f"'generator.tensor_parallel_size': got {lc.gpus_per_rank:g} / {gen.gpus_per_actor:g} / "
                          f"{gen.tensor_parallel_size} with placement.mode colocate; accepted: 1 / 1 / 1 (a vLLM generator "
                          "and a learner rank share one GPU: vLLM sleeps while the rank trains) or 0 / 0 / 1 on CPUs")
    if r.hosts_generator and lc.zero_stage == 3:
        raise ConfigError("config key 'learner.zero_stage': got 3 with placement.mode colocate and backend hf; "
                          "accepted: 0, 1 or 2 (the hosted generator reads the module's weights whole; ZeRO-3 holds a "
                          "shard per rank), or backend vllm (its weight sync gathers one bucket at a time)")
    if r.hosts_generator and gen.dtype != lc.dtype:
        raise ConfigError(f"config key 'generator.dtype': got {gen.dtype!r} with placement.mode colocate and "
                          f"learner.dtype {lc.dtype!r}; accepted: {lc.dtype!r} (the generator runs on the learner's "
                          "own weights)")


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch CUDA runtime means no GPUs
        return 0


def _rollout_managers(r: Recipe) -> None:
    """``grpo.rollout_managers`` runs the generate -> score -> reference chain in its actors: the
    setups whose chain needs the driver or the learner are refused before anything starts."""
    g, key = r.grpo, "config key 'grpo.rollout_managers'"
    _positive("grpo.manager_report_s", g.manager_report_s)
    if g.rollout_managers > r.generator.actor_range()[1]:
        raise ConfigError(f"{key}: got {g.rollout_managers} with generator.max_actors {r.generator.actor_range()[1]}; "
                          "accepted: at most one manager per generator")
    refused = [("grpo.completions_per_request", g.completions_per_request and g.completions_per_request < g.num_generations,
                "a group in parts is re-assembled by the driver"),
               ("placement.mode: colocate", r.colocated, "colocated generators sleep and wake with the driver's train steps"),
               ("learner.lora with a KL term", r.reference_on_learner,
                "the reference log-probs come from the learner ranks, between their train steps")]
    for what, on, why in refused:
        if on:
            raise ConfigError(f"{key}: got {g.rollout_managers} with {what}; accepted: 0 there ({why})")
