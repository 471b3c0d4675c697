"""The learner on one GPU: numbers, memory, speed and checkpoints at the 1.5B recipe's shapes.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json]
    python benchmarks/gpu_check.py --smoke      # the same checks on a tiny model, CPU and gloo

Needs only torch, transformers and DeepSpeed (no vLLM, no Ray): r1ray's own LearnerRank and
Reference on a random-weight Qwen2 built from Qwen2.5-1.5B's config (no hub), in a one-process
NCCL world, bf16 as in configs/qwen2.5-1.5b-h100.yaml. About 4-6 minutes on an H100/H200.

  1. gradient-accumulation invariance: one GRPO step on the same batch as one micro-batch and
     as four, under ZeRO-2 and ZeRO-3: loss, gradient norm, and the fp32 master weights'
     update (DeepSpeed's safe_get_full_fp32_param) agree within bf16 (update cosine);
  2. peak memory and seconds per micro-batch at 4 x 4,096 tokens with gradient checkpointing
     (ZeRO-2 and ZeRO-3);
  3. the chunked log-probs against the full logits' log_softmax, and the LM head in bf16
     (learner.logits_dtype "model") against fp32 ("float32");
  4. the reference's forward tokens/s;
  5. a checkpoint saved and restored: the next step's loss and the CUDA RNG's next draw are
     those of the run that went on without stopping.

Prints one table and writes the JSON. On a machine that cannot fetch packages, carry DeepSpeed
as wheels: ``pip wheel --no-deps -w wheels deepspeed==0.19.8 hjson ninja py-cpuinfo msgpack
einops`` here, then ``pip install --no-index --find-links wheels deepspeed`` there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")
SMOKE = dict(QWEN25_15B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


def _import_r1ray():
    """r1ray from an install, or from this checkout (the repository root is the package)."""
    try:
        import r1ray  # noqa: F401
    except ImportError:
        link = Path(tempfile.mkdtemp()) / "r1ray"
        link.symlink_to(HERE.parent, target_is_directory=True)
        sys.path.insert(0, str(link.parent))


def build_model(out: Path, config: dict) -> str:
    """A random-weight Qwen2 of ``config`` saved as an HF folder, with the tiny world's tokenizer
    (only its pad id is used: the batches are token ids)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1ray.controllers.common.tiny import build_tokenizer

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**config)).to(torch.bfloat16)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return str(out)


def grpo_batch(n: int, prompt: int, completion: int, vocab: int, seed: int):
    import torch

    from r1ray.actors.rollout import TrainSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        ids = torch.randint(3, vocab, (prompt + completion,), generator=g).tolist()
        out.append(TrainSample(ids[:prompt], ids[prompt:], logprobs=[-math.log(vocab)] * completion,
                               advantage=1.0 if k % 2 else -1.0))
    return out


class Check:
    def __init__(self, smoke: bool):
        import torch

        self.smoke, self.rows, self.results = smoke, [], {}
        self.cuda = torch.cuda.is_available()
        self.device_name = torch.cuda.get_device_name(0) if self.cuda else "cpu (smoke)"

    def row(self, name: str, value: str, ok: bool | None = None, **data):
        self.rows.append((name, value, "" if ok is None else ("ok" if ok else "FAIL")))
        self.results[name] = {"value": value, "ok": ok, **data}
        print(f"{name}: {value} {'' if ok is None else ('ok' if ok else 'FAIL')}", flush=True)


def learner(model: str, zero: int, mbs: int, checkpointing: bool = True, lr: float = 1e-3):
    from r1ray.actors.learner import LearnerConfig, LearnerRank, OptimConfig
    from r1ray.actors.server import free_port

    rank = LearnerRank(model, LearnerConfig(num_ranks=1, zero_stage=zero, micro_batch_size=mbs, dtype="bfloat16",
                                            gradient_checkpointing=checkpointing, optim=OptimConfig(lr=lr)))
    rank.setup("127.0.0.1", free_port())
    rank.start_phase(lr=lr)
    return rank


def watched(rank) -> dict:
    """fp32 master weights of a few tensors (embedding, first and last layer, final norm)."""
    from deepspeed.utils import safe_get_full_fp32_param

    names = [n for n, _ in rank.engine.module.named_parameters()]
    pick = [n for n in names if n.endswith(("embed_tokens.weight", "layers.0.self_attn.q_proj.weight",
                                            "mlp.down_proj.weight", "model.norm.weight"))]
    pick = pick[:2] + pick[-2:]
    params = dict(rank.engine.module.named_parameters())
    return {n: safe_get_full_fp32_param(params[n]).detach().float().cpu().clone() for n in pick}


def step(rank, batch) -> dict:
    from r1ray.actors.learner import GrpoStats

    tokens = float(sum(len(s.completion_ids) for s in batch))
    return GrpoStats.combine([rank.grpo_step(batch, tokens, tokens)])


def check_accumulation(c: Check, model: str, shape: dict):
    """Same batch, one micro-batch vs four, ZeRO-2 and ZeRO-3: the same step within bf16."""
    import gc

    import torch
    import torch.nn.functional as F

    batch = grpo_batch(8, shape["prompt"], shape["completion"], shape["vocab"], seed=1)
    runs = {}
    for zero in (2, 3):
        for mbs in (8, 2):
            rank = learner(model, zero, mbs)
            before = watched(rank)
            metrics = step(rank, batch)
            after = watched(rank)
            runs[(zero, mbs)] = (metrics, torch.cat([(after[k] - before[k]).flatten() for k in before]))
            del rank
            gc.collect()
            torch.cuda.empty_cache() if c.cuda else None
    base_m, base_u = runs[(2, 8)]
    for key, (m, u) in runs.items():
        if key == (2, 8):
            continue
        cos = float(F.cosine_similarity(u, base_u, dim=0))
        loss_rel = abs(m["loss"] - base_m["loss"]) / max(abs(base_m["loss"]), 1e-12)
        norm_rel = abs(m["grad_norm"] - base_m["grad_norm"]) / max(base_m["grad_norm"], 1e-12)
        ok = cos > 0.98 and loss_rel < 1e-2 and norm_rel < 3e-2
        c.row(f"grad accumulation: ZeRO-{key[0]} x{8 // key[1]} micro-batches vs ZeRO-2 x1",
              f"update cosine {cos:.4f}, loss {m['loss']:.5f} vs {base_m['loss']:.5f}, grad norm "
              f"{m['grad_norm']:.4f} vs {base_m['grad_norm']:.4f}", ok, cosine=cos, loss_rel=loss_rel, norm_rel=norm_rel)


def check_memory_and_speed(c: Check, model: str, shape: dict):
    """4 x 4,096-token sequences per micro-batch, gradient checkpointing, three steps."""
    import gc

    import torch

    for zero in (2, 3):
        rank = learner(model, zero, 4)
        batch = grpo_batch(4, shape["long_prompt"], shape["long_completion"], shape["vocab"], seed=2)
        if c.cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(3):
            if c.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(rank, batch)
            if c.cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**30 if c.cuda else _peak_rss_gib()
        tokens = 4 * (shape["long_prompt"] + shape["long_completion"])
        c.row(f"ZeRO-{zero}: 4 x {tokens // 4} tokens, checkpointing",
              f"{min(times[1:]):.2f} s per micro-batch (step incl. optimizer), peak "
              f"{'GPU memory' if c.cuda else 'RSS'} {peak:.2f} GiB",
              None, seconds=min(times[1:]), peak_gib=peak, tokens=tokens)
        del rank
        gc.collect()
        torch.cuda.empty_cache() if c.cuda else None


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def check_logprobs(c: Check, model: str, shape: dict):
    """The chunked head against full logits (no DeepSpeed: the HF module, bf16): with the head in
    fp32 against ``hidden @ W.float()``, and in bf16 against the model's own forward (both round
    logits to bf16, in differently shaped matmuls); then bf16 head against fp32 head."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from r1ray.actors.batching import pad_batch, token_logprobs

    device = "cuda" if c.cuda else "cpu"
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).to(device).eval()
    batch = grpo_batch(4, shape["prompt"], shape["completion"], shape["vocab"], seed=3)
    packed = pad_batch([s.prompt_ids for s in batch], [s.completion_ids for s in batch], 0).to(device)
    mask, targets = packed.completion_mask.bool(), packed.input_ids[:, 1:].unsqueeze(-1)
    with torch.no_grad():
        hidden = m.model(**packed.model_inputs()).last_hidden_state[:, :-1]
        full32 = F.log_softmax(F.linear(hidden.float(), m.lm_head.weight.float()), -1).gather(-1, targets).squeeze(-1)
        full16 = F.log_softmax(m(**packed.model_inputs()).logits[:, :-1].float(), -1).gather(-1, targets).squeeze(-1)
        head32 = token_logprobs(m, packed, chunk_tokens=1024, logits_dtype="float32")
        head16 = token_logprobs(m, packed, chunk_tokens=1024, logits_dtype="model")
    gap32 = float((head32 - full32)[mask].abs().max())
    gap16 = float((head16 - full16)[mask].abs().max())
    c.row("log-probs: chunked fp32 head vs full fp32 logits", f"worst |gap| {gap32:.2e}", gap32 < 1e-4, worst_gap=gap32)
    c.row("log-probs: chunked bf16 head vs the model's bf16 logits", f"worst |gap| {gap16:.2e}", gap16 < 5e-2,
          worst_gap=gap16)
    head_gap = (head32 - head16)[mask].abs()
    c.row("log-probs: bf16 head vs fp32 head", f"mean |gap| {float(head_gap.mean()):.2e}, worst "
          f"{float(head_gap.max()):.2e}", None, mean_gap=float(head_gap.mean()), worst_gap=float(head_gap.max()))


def check_reference(c: Check, model: str, shape: dict):
    import torch

    from r1ray.actors.reference import Reference

    ref = Reference(model, dtype="bfloat16", micro_batch_size=8)
    batch = grpo_batch(16, shape["prompt"], shape["long_completion"] // 2, shape["vocab"], seed=4)
    ref.logprobs(batch[:8])  # warm-up
    if c.cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    ref.logprobs(batch)
    if c.cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = sum(len(s.prompt_ids) + len(s.completion_ids) for s in batch)
    c.row("reference forward (bf16, micro-batch 8)", f"{tokens / seconds:,.0f} tokens/s", None,
          tokens_per_s=tokens / seconds)


def check_checkpoint(c: Check, model: str, shape: dict, tmp: Path):
    """Save after a step; the next step and the next CUDA draw, then restore and repeat them."""
    import torch

    rank = learner(model, 3, 4)
    batch = grpo_batch(8, shape["prompt"], shape["completion"], shape["vocab"], seed=5)
    step(rank, batch)
    rank.save_checkpoint(str(tmp / "ckpt"), "step-1")
    draw = lambda: torch.rand(4, device="cuda" if c.cuda else "cpu")  # noqa: E731
    first_draw, first = draw(), step(rank, batch)
    rank.load_checkpoint(str(tmp / "ckpt"), "step-1")
    again_draw, again = draw(), step(rank, batch)
    ok = torch.equal(first_draw, again_draw) and math.isclose(first["loss"], again["loss"], rel_tol=1e-6) \
        and math.isclose(first["grad_norm"], again["grad_norm"], rel_tol=1e-5)
    c.row("checkpoint (ZeRO-3) saved and restored", f"next loss {first['loss']:.6f} / {again['loss']:.6f}, "
          f"grad norm {first['grad_norm']:.5f} / {again['grad_norm']:.5f}, RNG draw equal: "
          f"{torch.equal(first_draw, again_draw)}", ok)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results" / "gpu_check.json"))
    ap.add_argument("--smoke", action="store_true", help="a tiny model on this machine's CPU (gloo)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not torch.cuda.is_available():
        if not args.smoke:
            print("no GPU here: run with --smoke for the CPU version of these checks", file=sys.stderr)
            return 2
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _import_r1ray()
    config = SMOKE if args.smoke else QWEN25_15B
    shape = dict(prompt=32, completion=96, long_prompt=32, long_completion=96, vocab=config["vocab_size"]) \
        if args.smoke else dict(prompt=256, completion=768, long_prompt=512, long_completion=3584,
                                vocab=config["vocab_size"])
    c = Check(args.smoke)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model", config)
        for check in (check_accumulation, check_memory_and_speed, check_logprobs, check_reference):
            check(c, model, shape)
        check_checkpoint(c, model, shape, Path(tmp))
    wall = time.perf_counter() - t0
    import deepspeed
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}"
    print(f"\n{c.device_name}: Qwen2.5-1.5B-shaped random model{' (smoke: tiny)' if args.smoke else ''}, "
          f"bf16, one-process {'NCCL' if c.cuda else 'gloo'} world; {versions}; {wall:.0f} s\n")
    print("| check | result | |\n|---|---|---|")
    for name, value, ok in c.rows:
        print(f"| {name} | {value} | {ok} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": c.device_name, "smoke": args.smoke, "versions": versions,
                                          "wall_s": wall, "checks": c.results}, indent=2))
    return 0 if all(r["ok"] is not False for r in c.results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
