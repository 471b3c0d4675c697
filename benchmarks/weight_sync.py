"""Weight sync, before and after: learner weights from 2 DeepSpeed ranks to 1 and 2 vLLM generators,
and LoRA's adapter-only syncs against full ones into hf generators.

    python benchmarks/weight_sync.py [--sizes 10M 100M 500M] [--generators 1 2] [--repeats 3]
    python benchmarks/weight_sync.py --paths hf-full hf-lora --sizes 100M 500M --generators 1 --name weight_sync_lora

Random-weight Qwen2-shaped models (about 10M, 100M, 500M and, where memory allows, 1B
parameters, fp32 on the wire as the CPU recipe sends them), two real learner ranks (DeepSpeed
ZeRO-2 over gloo, as the tiny recipe) and vLLM generators on vLLM's async engine (engine core
and worker in processes of their own, as on a GPU). Two paths:

- ``blob`` (before): rank 0 ``torch.save``s the state dict into one bytes object; it goes
  through Ray's object store to each generator, then through ``collective_rpc`` (msgpack) to
  vLLM's worker, which ``torch.load``s it and reloads the weights in place.
- ``collective`` (now): vLLM's weight-transfer API; learner rank 0 broadcasts the tensors by
  name in buckets of ``--bucket-mb`` over a gloo group spanning it and every vLLM worker.
- ``hf-full`` / ``hf-lora``: the ``hf`` generator's path (rank 0's serialised export through the
  object store into ``Generator.load_weights``), the whole model against LoRA adapters
  (``learner.lora`` r=``--lora-r``, every linear layer): only the adapters cross the wire.

Reported per size, generator count and path: seconds per sync (median of the repeats, after one
warm-up sync), GB/s of weights delivered to each generator, the share of this machine's memcpy
bandwidth (one 1 GiB tensor copy, measured here: the limit of any in-memory path), and the
extra peak resident memory of learner rank 0 and of the busiest generator (its actor process
with vLLM's engine core and worker, sampled every 5 ms) over its resident memory before the
sync. Writes benchmarks/results/weight_sync.{json,md,png}. Needs ``pip install -e .[bench]``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {  # hidden, layers, intermediate, heads, kv heads; vocabulary 32768, tied embeddings
    "10M": (256, 4, 768, 4, 2),
    "100M": (768, 10, 2048, 12, 4),
    "500M": (1536, 16, 4096, 12, 4),
    "1B": (2048, 16, 5632, 16, 4),
}
VOCAB = 32768


def build_model(size: str, root: Path) -> tuple[str, int]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1ray.controllers.common.tiny import build_tokenizer

    out = root / size
    hidden, layers, inter, heads, kv = SIZES[size]
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512,
                      tie_word_embeddings=True)
    if not (out / "config.json").exists():
        import torch

        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg)
        model.save_pretrained(out)
        build_tokenizer().save_pretrained(out)
        del model
    from transformers import AutoModelForCausalLM

    with __import__("torch").device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    return str(out), params


def memcpy_gbps() -> float:
    import torch

    src = torch.ones(1 << 28)  # 1 GiB of fp32
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return src.numel() * 4 / min(times) / 1e9


# -- resident memory of an actor's process tree, sampled inside the actor ---------------------
def _start_sampler(actor) -> None:
    import psutil

    def tree_rss():
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    actor._rss = {"now": tree_rss(), "peak": 0}

    def loop():
        while True:
            actor._rss["now"] = rss = tree_rss()
            actor._rss["peak"] = max(actor._rss["peak"], rss)
            time.sleep(0.005)

    threading.Thread(target=loop, daemon=True).start()


def _reset_peak(actor) -> int:
    time.sleep(0.05)
    actor._rss["peak"] = actor._rss["now"]
    return actor._rss["now"]


def _peak(actor) -> int:
    return actor._rss["peak"]


class BlobGenerator:
    """The generator side of the old path: vLLM's async engine with the blob worker extension."""

    def __init__(self, model_path: str):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.engine = self._run(self._start(model_path))

    async def _start(self, model_path):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(model=model_path, dtype="float32", max_model_len=256,
                                                         enforce_eager=True, worker_extension_cls="_blob_sync.BlobSync"))

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def load_weights(self, blob: bytes) -> None:
        self._run(self.engine.collective_rpc("r1ray_load_weights", args=(blob,)))
        self._run(self.engine.reset_prefix_cache())

    def greedy(self, prompt: list[int]) -> list[int]:
        from vllm import SamplingParams, TokensPrompt

        async def go():
            final = None
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt),
                                                  SamplingParams(max_tokens=8, temperature=0), request_id=uuid.uuid4().hex):
                final = out
            return list(final.outputs[0].token_ids)

        return self._run(go())

    def ping(self) -> str:
        return "ok"


def run_case(path: str, model: str, n_gen: int, repeats: int, bucket_mb: int, lora_r: int = 16) -> dict:
    import ray

    from r1ray.actors.generator import Generator, GeneratorConfig
    from r1ray.actors.learner import LearnerConfig, LearnerRank
    from r1ray.actors.lora import LoraConfig
    from r1ray.cluster.groups import ActorGroup, rendezvous_on
    from r1ray.cluster.weight_sync import start_transfer

    lora = LoraConfig(r=lora_r, alpha=2 * lora_r, dropout=0.0) if path == "hf-lora" else None
    lcfg = LearnerConfig(num_ranks=2, zero_stage=2, micro_batch_size=1, lora=lora)
    learners = ActorGroup("learner-rank", LearnerRank, 2, lambda i: ((model, lcfg, i, 2, 0), {}), num_cpus=0.5,
                          timeout_s=1800)
    addr, port = rendezvous_on(learners.actors[0])
    learners.get(learners.call_all(LearnerRank.setup, addr, port, 1800.0), "setup")
    if path == "collective":
        gcfg = GeneratorConfig(backend="vllm", max_model_len=256, cpu_kv_cache_gib=1, bucket_mb=bucket_mb)
        gens = ActorGroup("generator", Generator, n_gen, lambda i: ((model, gcfg, i), {}), num_cpus=0.25,
                          timeout_s=1800, max_concurrency=4)
    elif path.startswith("hf-"):
        gcfg = GeneratorConfig(backend="hf", max_model_len=256)
        gens = ActorGroup("generator", Generator, n_gen, lambda i: ((model, gcfg, i), {"lora": lora}), num_cpus=0.25,
                          timeout_s=1800)
    else:
        gens = ActorGroup("blob-generator", BlobGenerator, n_gen, lambda i: ((model,), {}), num_cpus=0.25,
                          timeout_s=1800)
    gens.wait_ready()
    if path == "collective":
        addr, port = rendezvous_on(learners.actors[0])
        learners.get(start_transfer(learners, gens.actors, gens.names(), "r1ray_gloo", addr, port, bucket_mb << 20,
                                    "float32", 1800.0),
                     "handshake")
    watched = [learners.actors[0], *gens.actors]
    ray.get([a.__ray_call__.remote(_start_sampler) for a in watched])

    sent = []  # bytes of one export (the blob paths)

    def sync(version: int) -> float:
        t0 = time.perf_counter()
        if path == "collective":
            ray.get(learners.call_all(LearnerRank.send_weights, version))
        elif path.startswith("hf-"):
            exports = learners.call_all(LearnerRank.export_weights, "float32")
            ray.get([g.load_weights.remote(exports[0], version) for g in gens.actors] + exports[1:])
            if not sent:
                sent.append(len(ray.get(exports[0])))
        else:
            exports = learners.call_all(LearnerRank.export_weights, "float32")
            ray.get([g.load_weights.remote(exports[0]) for g in gens.actors] + exports[1:])
        return time.perf_counter() - t0

    sync(1)  # warm-up: first-call costs (imports, buffers) are not what a run pays per step
    times, extra_learner, extra_gen = [], [], []
    for k in range(repeats):
        base = ray.get([a.__ray_call__.remote(_reset_peak) for a in watched])
        times.append(sync(2 + k))
        peak = ray.get([a.__ray_call__.remote(_peak) for a in watched])
        extra_learner.append(peak[0] - base[0])
        extra_gen.append(max(p - b for p, b in zip(peak[1:], base[1:])))
    for group in (gens, learners):
        group.kill()
    return {"seconds": statistics.median(times), "all_seconds": times, **({"bytes": sent[0]} if sent else {}),
            "learner_extra_peak_mb": max(extra_learner) / 2**20, "generator_extra_peak_mb": max(extra_gen) / 2**20}


def report(rows: list[dict], bandwidth: float, name: str, paths: list[str], generators: list[int]) -> None:
    """benchmarks/results/<name>.md (the table) and .png (seconds per sync against model size)."""
    results = HERE / "results"
    lines = [f"memcpy bandwidth on this machine: {bandwidth:.2f} GB/s", "",
             "| model | generators | path | MB / sync | s / sync | GB/s per generator | of memcpy | "
             "learner rank 0 extra peak MiB | generator extra peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "seconds" in r:
            lines.append(f"| {r['size']} ({r['params'] / 1e6:.0f}M) | {r['generators']} | {r['path']} | "
                         f"{r['bytes'] / 1e6:.1f} | {r['seconds']:.2f} | "
                         f"{r['gbps']:.2f} | {r['of_memcpy']:.0%} | {r['learner_extra_peak_mb']:.0f} | "
                         f"{r['generator_extra_peak_mb']:.0f} |")
        else:
            lines.append(f"| {r['size']} | {r['generators']} | {r['path']} | | failed: {r['error']} | | | | |")
    table = "\n".join(lines)
    print("\n" + table)
    (results / f"{name}.md").write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for path in paths:
            for n_gen in generators:
                pts = [(r["params"], r["seconds"]) for r in rows if r["path"] == path and r["generators"] == n_gen
                       and "seconds" in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", linestyle="-" if path in ("collective", "hf-lora") else "--",
                            label=f"{path}, {n_gen} generator{'s' if n_gen > 1 else ''}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("seconds per sync")
        ax.set_title("Weight sync, 2 learner ranks -> vLLM generators (CPU)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(results / f"{name}.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e .[bench])")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["10M", "100M", "500M"], choices=list(SIZES))
    ap.add_argument("--generators", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--paths", nargs="+", default=["blob", "collective"],
                    choices=["blob", "collective", "hf-full", "hf-lora"])
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=512)
    ap.add_argument("--models", default=str(Path.home() / ".cache" / "r1ray" / "bench-models"))
    ap.add_argument("--name", default="weight_sync")
    ap.add_argument("--report", action="store_true", help="only rebuild the table and plot from results/<name>.json")
    args = ap.parse_args()
    if args.report:
        saved = json.loads((HERE / "results" / f"{args.name}.json").read_text())
        rows = [{**r, "error": r["error"].splitlines()[0][:160]} if "error" in r else r for r in saved["rows"]]
        report(rows, saved["memcpy_gbps"], args.name, args.paths, args.generators)
        return 0
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    bandwidth = memcpy_gbps()
    print(f"memcpy bandwidth here: {bandwidth:.2f} GB/s", flush=True)
    rows = []
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    for size in args.sizes:
        model, params = build_model(size, Path(args.models))
        for n_gen in args.generators:
            for path in args.paths:
                ray.init(num_cpus=os.cpu_count(), object_store_memory=6 << 30, include_dashboard=False,
                         logging_level="ERROR", runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"],
                                                                          "DS_ACCELERATOR": "cpu"}})
                try:
                    r = run_case(path, model, n_gen, args.repeats, args.bucket_mb, args.lora_r)
                except Exception as e:  # noqa: BLE001 - a case that cannot run here is reported, not fatal
                    r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
                finally:
                    ray.shutdown()
                r = {"bytes": params * 4, **r, "size": size, "params": params, "generators": n_gen, "path": path}
                if "seconds" in r:
                    r["gbps"] = r["bytes"] / r["seconds"] / 1e9
                    r["of_memcpy"] = r["gbps"] / bandwidth
                rows.append(r)
                print(json.dumps(r), flush=True)
                (results / f"{args.name}.json").write_text(json.dumps({"memcpy_gbps": bandwidth, "rows": rows}, indent=1))
    report(rows, bandwidth, args.name, args.paths, args.generators)
    return 0


if __name__ == "__main__":
    sys.exit(main())
