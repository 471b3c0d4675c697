"""r1ray sft against TRL 1.16's SFTTrainer on the same SFT work, back to back on this machine.

    pip install -e .[bench]          # trl==1.16.0 and matplotlib, beside the CPU stack
    python benchmarks/sft_vs_trl.py [--steps 150]

The tiny world's base model (untrained) and its reasoning traces (20,000 single-turn
conversations; the first 256 of the test split for the held-out loss), the same
hyper-parameters for both: fp32, AdamW (betas 0.9 / 0.999, no weight decay), lr 1e-3 with 10
warm-up steps and a cosine decay, grad clip 1.0, loss on the answer only, mean over answer
tokens. Two settings:

- unpacked: 64 conversations per step, one per row (right-padded);
- packed: rows of 256 tokens (best-fit decreasing in both); TRL takes 15 packed rows per step
  (its batch counts rows), r1ray 64 conversations per step packed into rows (about 15).

TRL runs as its users call it (``SFTTrainer(model, args=SFTConfig(...), train_dataset=...,
eval_dataset=...)``, ``trainer.train()``, ``trainer.evaluate()``) in a process of its own, with
a prompt/completion dataset (its completion-only loss; its completion also trains the newline
the chat template puts after the end-of-turn token, one token per conversation that r1ray does
not train). r1ray runs ``r1ray sft`` with 1 learner rank (TRL is one process on the same 2
cores; the rank gets every core's torch threads, as TRL's process does) and with 2 (one thread
each). Reported: training seconds, tokens/s (every token of the rows, prompts
included), peak resident memory of the whole process tree, and the final held-out loss;
written to benchmarks/results/sft_vs_trl.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vs_trl import run  # noqa: E402 - the sibling benchmark's process runner and peak-memory sampler

ROOT = HERE.parent
RECIPE = ROOT / "configs" / "tiny-cpu.yaml"
EVAL_EXAMPLES = 256
SETTINGS = {"unpacked": {"packing": False}, "packed": {"packing": True, "max_len": 256, "trl_rows": 15}}


def r1ray_sft(out: Path, steps: int, ranks: int, setting: dict) -> tuple[dict, float]:
    sets = [f"sft.steps={steps}", "sft.batch_size=64", "sft.lr=1.0e-3", "sft.warmup_steps=10", "sft.schedule=cosine",
            "sft.min_lr_ratio=0.0", f"sft.eval_every={steps}", f"sft.eval_examples={EVAL_EXAMPLES}",
            "sft.stop_at_pass_rate=null", f"learner.num_ranks={ranks}", f"learner.micro_batch_size={64 // ranks}",
            f"learner.threads_per_rank={max(1, (os.cpu_count() or 1) // ranks)}",  # TRL's one process uses every core
            "learner.optim.betas=[0.9, 0.999]", "learner.optim.weight_decay=0.0", "learner.optim.grad_clip=1.0",
            "learner.dtype=float32", "checkpoint.every_steps=0", "ray.dashboard=false"]
    if setting["packing"]:
        sets += ["sft.packing=true", f"sft.max_seq_length={setting['max_len']}"]
    cmd = [sys.executable, "-m", "r1ray.controllers.cli", "sft", str(RECIPE), "--output-dir", str(out),
           *[x for s in sets for x in ("--set", s)]]
    stdout, gib = run(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    run_dir = next(line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("run directory"))
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    records = [json.loads(line) for line in (Path(run_dir) / "sft_metrics.jsonl").read_text().splitlines()]
    return {"train_s": sum(r["time/step_s"] for r in records), "tokens_per_s": summary["tokens_per_s"],
            "peak_rss_gib": gib, "eval_loss": summary["final_eval_loss"], "final_loss": summary["final_loss"],
            "padding_waste": summary["padding_waste"], "loss_curve": [r["loss"] for r in records]}, gib


def trl_worker(args) -> int:
    """In its own process: TRL's SFTTrainer on the same work; prints one JSON line."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    setting = SETTINGS[args.setting]
    splits = datasets.load_from_disk(str(Path(args.tiny) / "data"))

    def prompt_completion(row):
        msgs = row["messages"]
        return {"prompt": msgs[:-1], "completion": msgs[-1:]}

    train = splits["train"].map(prompt_completion, remove_columns=splits["train"].column_names)
    held_out = splits["test"].select(range(EVAL_EXAMPLES)).map(prompt_completion,
                                                                remove_columns=splits["test"].column_names)
    batch = setting.get("trl_rows", 64)
    config = SFTConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=batch, per_device_eval_batch_size=64,
        gradient_accumulation_steps=1, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=10,
        adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0, max_grad_norm=1.0, bf16=False, fp16=False, use_cpu=True,
        seed=0, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, packing=setting["packing"], max_length=setting.get("max_len", 1024),
        completion_only_loss=True, eval_packing=False)
    trainer = SFTTrainer(model=args.model, args=config, train_dataset=train, eval_dataset=held_out)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    rows = trainer.train_dataset
    lengths = rows["seq_lengths"] if "seq_lengths" in rows.column_names else None
    mean_row = (sum(sum(x) for x in lengths) / len(lengths)) if lengths else \
        sum(len(x) for x in rows["input_ids"]) / len(rows)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(json.dumps({"train_s": seconds, "tokens_per_s": args.steps * batch * mean_row / seconds,
                      "eval_loss": trainer.evaluate()["eval_loss"], "final_loss": losses[-1], "loss_curve": losses}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", default="runs/bench-sft-vs-trl")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--setting", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:
        return trl_worker(args)
    out = Path(args.out).resolve()
    from r1ray.controllers.common.tiny import build_tiny_world

    tiny = build_tiny_world(Path("~/.cache/r1ray/tiny-world").expanduser())
    rows: dict[str, dict] = {}
    for name in args.settings:
        for ranks in args.ranks:
            label = f"{name}: r1ray ({ranks} learner rank{'s' if ranks > 1 else ''})"
            rows[label], _ = r1ray_sft(out / f"r1ray-{name}-{ranks}", args.steps, ranks, SETTINGS[name])
            print(label, {k: v for k, v in rows[label].items() if k != "loss_curve"}, flush=True)
        stdout, gib = run([sys.executable, __file__, "--trl-worker", "--setting", name, "--model", str(tiny / "model"),
                           "--tiny", str(tiny), "--out", str(out / f"trl-{name}"), "--steps", str(args.steps)],
                          env={**os.environ})
        label = f"{name}: TRL 1.16 SFTTrainer"
        rows[label] = {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss_gib": gib}
        print(label, {k: v for k, v in rows[label].items() if k != "loss_curve"}, flush=True)
    report(rows, args.steps)
    return 0


def report(rows: dict[str, dict], steps: int) -> None:
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "sft_vs_trl.json").write_text(json.dumps({"steps": steps, "rows": rows}, indent=2))
    lines = [f"SFT, {steps} steps of 64 conversations (tiny world, 2-core CPU, fp32)", "",
             "| setting / framework | train s | tokens/s | peak RSS GiB | final train loss | held-out loss |",
             "|---|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['train_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_rss_gib']:.2f} | "
                     f"{r['final_loss']:.4f} | {r['eval_loss']:.4f} |")
    curves = {k: v["loss_curve"] for k, v in rows.items()}
    gaps = []
    for name in SETTINGS:
        trl = curves.get(f"{name}: TRL 1.16 SFTTrainer")
        mine = curves.get(f"{name}: r1ray (1 learner rank)")
        if trl and mine:
            n = min(len(trl), len(mine))
            gaps.append(f"{name}: mean |r1ray - TRL| train loss over the {n} steps "
                        f"{sum(abs(a - b) for a, b in zip(mine[:n], trl[:n])) / n:.4f}")
    (results / "sft_vs_trl.md").write_text("\n".join(lines + [""] + gaps) + "\n")
    print("\n".join(lines + [""] + gaps))


if __name__ == "__main__":
    sys.exit(main())
