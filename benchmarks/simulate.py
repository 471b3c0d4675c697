"""r1ray's GRPO driver against simulated fleets: validated here, then predicting H100 clusters.

    python benchmarks/simulate.py validate [--measured runs/sim-validate] [--measure [--repeat 3]] [--fixed 1.5 1 2 1]
    python benchmarks/simulate.py predict [--steps 8] [--only 7b-64]
    python benchmarks/simulate.py fixes [--scenario 7b-64]
    python benchmarks/simulate.py colocate [--only 7b-64]
    python benchmarks/simulate.py ray-costs      # Ray's driver-side CPU per call, wait, completion, number pickled
    python benchmarks/simulate.py overhead [--generators 256 --ranks 64] [--set key=value] [--name stem]
    python benchmarks/simulate.py driver-limit [--generators 256 512 1024] [--etas 1] [--per-manager 8]
    python benchmarks/simulate.py elastic [--scenario 7b-64] [--eta 1] [--at 8] [--start-s 60]
    python benchmarks/simulate.py kv [--scenario 1.5b-16k] [--etas 0 1 2 4] [--max-num-seqs 512 1024]

The driver's own code (``GrpoDriver``: admission, the staleness bound, the in-flight table,
elastic slots, weight-sync sequencing) runs unchanged on a simulated clock against the
actors of ``benchmarks/simfleet.py``; see docs/simulator.md for the cost model and its sources.

validate: the tiny recipe measured on this machine (``benchmarks/async_vs_sync.py`` at
max_staleness 0, 1, 2, 4; ``--measure`` runs it ``--repeat`` times, each figure their median)
against the simulator with costs fitted from the max_staleness=0 runs' timelines (each call's
solo seconds under processor sharing of the CPU's cores) and Ray's dispatch latency from the
gaps between stages. The cores each kind of call keeps busy are fitted on max_staleness 0 and 1
(a grid); 2 and 4 are held out. ``--fixed`` holds them at values fitted before (stop 48's:
1.5 1 2 1) and predicts every max_staleness.

predict: seconds per step, samples/s and busy fractions for the 1.5B recipes on 8 H100s (4K
and 16K completions) and the 7B recipe on 8, 64 and 256 (its actor counts and batch scaled
together) at max_staleness 0, 1, 2, 4, with and without partial rollouts
(``generator.pause_mode`` keep / wait); each row also gives the fullest engine's KV cache.

fixes: the changes the predictions point at, one on top of the other, for the 7B recipe on 64
GPUs at max_staleness 0, 1, 2.

colocate: each scenario split (max_staleness 0, 1, 2) against the same GPUs colocated
(``placement.mode: colocate``: every learner rank hosts a vLLM engine that sleeps while the
rank trains; the reference actors keep their GPUs; max_staleness 0, the only one it allows).

overhead: the driver's own CPU seconds and Ray calls per step, and its memory, with 256
simulated generators and 64 learner ranks; and the step again with the driver's thread on the
simulated clock (each of its turns taking what its Python, Ray's share of its calls and their
pickling cost here), to see whether the fleet waits for it. With ``grpo.rollout_managers`` the
managers' side too: each one's CPU a step, and the busiest one's calls and share of the step.

driver-limit: that comparison, the driver free against the driver on the clock, at 256, 512
and 1,024 generators in the 7B recipe's proportions: where one driver stops keeping up.

memory: what the driver holds on to from step to step in that run (tracemalloc).

kv: the long-trace recipe (16,384-token completions) against its engines' KV caches, at each
max_staleness and ``generator.max_num_seqs``, with the caches' bound and without it.

elastic: one generator lost while generating, lost during a weight sync, drained (``r1ray
scale``) during a weight sync, or added, against a run without: the run's seconds, how many
groups were generated again and what the elastic group counted.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _train import pyplot, save_results  # noqa: E402
from simfleet import (  # noqa: E402
    QWEN_1_5B,
    QWEN_7B,
    Fleet,
    GpuCosts,
    Lengths,
    VllmDevice,
    fit_cpu_costs,
    numbers,
    read_timeline,
    run_driver,
)

from r1ray.actors.rollout import Rollout, TokenIds  # noqa: E402
from r1ray.controllers.common.runlog import MetricsWriter  # noqa: E402
from r1ray.controllers.config import ConfigError  # noqa: E402
from r1ray.controllers.config.load import load_recipe  # noqa: E402

TINY = HERE.parent / "configs" / "tiny-cpu.yaml"
KINDS = ("generate", "score", "ref_logprobs", "train", "export_weights", "load_weights")


def load(recipe, sets: list[str]):
    """A recipe for a simulated fleet: checked, but against the fleet it asks for."""
    return load_recipe(str(recipe), sets, cpus=1e9, gpus=1e9)


# -- validation on this machine -----------------------------------------------------------
def stage_gaps(spans: list[dict]) -> list[float]:
    """Ray's dispatch latency on this machine, sampled: each gap from a call's end to the start
    of the call it lets the driver send (generate -> score -> reference -> train -> export ->
    load), over one run's spans (``read_timeline``)."""
    chain = ["generate", "score", "ref_logprobs", "train", "export_weights", "load_weights"]
    gaps = []
    for a, b in zip(chain, chain[1:]):
        starts = sorted(s["t0"] for s in spans if s["kind"] == b)
        for s in spans:
            if s["kind"] == a:
                later = [t - s["t1"] for t in starts if t >= s["t1"] - 1e-4]
                if later:
                    gaps.append(max(0.0, min(later)))
    return gaps


def measured(run_dir: Path) -> dict:
    g = json.loads((run_dir / "summary.json").read_text())["grpo"]
    return {"time_s": g["time_s"], "samples_per_s": g["samples_per_s"],
            "busy": {k: round(1 - v["idle_ratio"], 4) for k, v in g["utilisation"].items()}}


def measured_runs(root: Path) -> list[Path]:
    """The measured runs under ``root``: ``run-1``, ``run-2``, ... (``--measure --repeat``), or
    ``root`` itself holding one run's ``eta-<n>`` (as stop 48 measured)."""
    runs = sorted((p for p in root.glob("run-*") if (p / "eta-0").is_dir()), key=lambda p: int(p.name[4:]))
    if runs:
        return runs
    if (root / "eta-0").is_dir():
        return [root]
    raise SystemExit(f"validate: no measured runs under {root} (run-<k>/eta-<n> or eta-<n>): pass --measure")


def median_of(runs: list[dict]) -> dict:
    """Each figure's median over repeated runs of one max_staleness, and each one's runs."""
    return {"time_s": statistics.median(r["time_s"] for r in runs),
            "samples_per_s": statistics.median(r["samples_per_s"] for r in runs),
            "busy": {k: statistics.median(r["busy"][k] for r in runs) for k in runs[0]["busy"]},
            "runs": runs}


def pooled_spans(runs: list[Path]) -> tuple[list[dict], float]:
    """The max_staleness=0 runs' spans, one after the other on one time axis (each run's own
    clock starts at 0: they must not overlap), and Ray's dispatch latency, the median of
    every run's gaps between stages."""
    spans, gaps, shift = [], [], 0.0
    for run in runs:
        own = read_timeline(run / "eta-0" / "timeline.json")
        gaps += stage_gaps(own)
        spans += [{**sp, "t0": sp["t0"] + shift, "t1": sp["t1"] + shift} for sp in own]
        shift += max(sp["t1"] for sp in own) + 1.0
    return spans, statistics.median(gaps)


def simulate_tiny(eta: int, steps: int, costs) -> dict:
    r = load(TINY, [f"grpo.max_staleness={eta}", f"grpo.steps={steps}"])
    driver, _ = run_driver(r, Fleet(r, costs, Lengths(r.sampling.max_new_tokens, 30, 0.3, 0.2), seed=r.seed))
    s = driver.summary()
    return {"time_s": s["time_s"], "samples_per_s": s["samples_per_s"],
            "busy": {k: round(1 - v["idle_ratio"], 4) for k, v in s["utilisation"].items()}}


def errors(pred: dict, meas: dict) -> dict:
    """Relative errors: seconds, and each group's busy fraction."""
    out = {"time_s": pred["time_s"] / meas["time_s"] - 1}
    for k, b in meas["busy"].items():
        out[f"busy/{k}"] = pred["busy"][k] / b - 1 if b > 0 else 0.0
    return out


def span(values, fmt: str) -> str:
    """``min-max`` of ``values``, each formatted with ``fmt``."""
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def validate(args) -> int:
    root = Path(args.measured)
    if args.measure:  # (a run per repeat, each from its own SFT warm-up: this machine's speed varies by the hour)
        import subprocess

        for k in range(1, args.repeat + 1):
            subprocess.run([sys.executable, str(HERE / "async_vs_sync.py"), "--etas", "0", "1",
                            *map(str, args.held_out), "--steps", str(args.steps), "--name", f"sim_measured_{k}",
                            "--out", str(root / f"run-{k}")], check=True)
    runs = measured_runs(root)
    etas = (0, 1, *args.held_out)
    meas = {eta: median_of([measured(run / f"eta-{eta}") for run in runs]) for eta in etas}
    steps = json.loads((runs[0] / "eta-0" / "summary.json").read_text())["grpo"]["steps"]
    spans, latency = pooled_spans(runs)  # (read once: the grid fits from them 162 times)
    best = None
    # (background: the CPU of what the spans leave out, Ray's processes, the driver, the scorer's
    # verifier processes; up to 0.3 core until stop 48, when the learner's busy time, once
    # inflated by the reference's, stopped hiding that the fit wanted more)
    grid = itertools.product([1.0, 1.5, 2.0], [1.0, 1.5, 2.0], [1.0, 1.5, 2.0], [0.0, 0.25, 0.5, 0.75, 1.0, 1.25])
    fixed = args.fixed is not None
    if fixed:  # cores fitted before (on other runs) held: every max_staleness is then out of sample for them
        grid = [tuple(args.fixed)]
    for gen, train, ref, background in grid:  # the cores each kind keeps busy: fitted on eta 0 and 1
        threads = {**dict.fromkeys(KINDS, 1.0), "generate": gen, "train": train, "ref_logprobs": ref}
        costs = fit_cpu_costs(spans, args.cores, threads, background)
        costs.latency_s = latency
        fit = {eta: simulate_tiny(eta, steps, costs) for eta in (0, 1)}
        worst = max(abs(e) for eta in fit for e in errors(fit[eta], meas[eta]).values())
        if best is None or worst < best[0]:
            best = (worst, threads, background, costs, fit)
    worst, threads, background, costs, fit = best
    rows = []
    for eta in etas:
        pred = fit[eta] if eta in fit else simulate_tiny(eta, steps, costs)  # (the fit's runs are seeded: kept)
        rows.append({"eta": eta, "role": "held out" if fixed or eta >= 2 else "fitted", "measured": meas[eta],
                     "predicted": pred, "errors": errors(pred, meas[eta])})
    lines = [f"Tiny recipe, {steps} GRPO steps, this machine ({args.cores:g} cores); measured: each figure the median "
             f"of {len(runs)} run(s) ({', '.join(str(r) for r in runs)}). Costs: solo seconds per call from the "
             f"max_staleness=0 runs' timelines; Ray dispatch {latency * 1000:.1f} ms (median gap between stages); "
             f"cores per call {'given (--fixed)' if fixed else 'fitted on max_staleness 0 and 1'}: {threads}, "
             f"background {background:g}.", "",
             "| max_staleness | | GRPO s | samples/s | generator busy | learner busy | reference busy | scorer busy |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for what in ("measured", "predicted"):
            x = r[what]
            lines.append(f"| {r['eta']} ({r['role']}) | {what} | {x['time_s']:.1f} | {x['samples_per_s']:.1f} | "
                         + " | ".join(f"{x['busy'][k]:.2f}" for k in ("generator", "learner", "reference", "scorer"))
                         + " |")
        if len(runs) > 1:  # the spread of the runs the medians are of
            m = r["measured"]["runs"]
            lines.append(f"| | measured, range of {len(runs)} | {span([x['time_s'] for x in m], '{:.1f}')} | "
                         f"{span([x['samples_per_s'] for x in m], '{:.1f}')} | "
                         + " | ".join(span([x["busy"][k] for x in m], "{:.2f}")
                                      for k in ("generator", "learner", "reference", "scorer")) + " |")
        e = r["errors"]
        lines.append(f"| | error | {e['time_s']:+.0%} | {-e['time_s'] / (1 + e['time_s']):+.0%} | "
                     + " | ".join(f"{e['busy/' + k]:+.0%}" for k in ("generator", "learner", "reference", "scorer"))
                     + " |")
    worst_all = max(abs(v) for r in rows for v in r["errors"].values())
    lines.append(f"\nLargest error: {worst_all:.1%} (aim: 15%).")
    table = "\n".join(lines)
    print(table)
    save_results(args.name, {"steps": steps, "cores": args.cores, "runs": [str(r) for r in runs], "fixed": fixed,
                                         "latency_s": latency, "threads": threads,
                                         "background": background, "costs": vars(costs), "rows": rows,
                                         "largest_error": worst_all}, table)
    return 0


# -- predictions for H100 clusters ----------------------------------------------------------
def prompt_tokens(median: int):
    return lambda rng: int(median * math.exp(rng.gauss(0.0, 0.3)))


# 7B: fitted to a published verl GRPO step with vLLM at the 7B recipe's cap, 8,192 completions of at most
# 1,024 tokens: mean 424.5, 7.37% cut at the cap (the example log in llm-d-incubation/py-inference-scheduler,
# integration/verl/README.md); its minimum, 26, is held out (the fit's draws: 11-28, median 20).
# 1.5B: fitted to DeepScaleR's GRPO run of the same model (DeepSeek-R1-Distill-Qwen-1.5B, temperature 0.6)
# at an 8,192-token cap, where its blog gives two figures of about the same point of the run (~1,000 steps,
# the low of its length curve): a mean of about 3,500 tokens and 4.2% of the completions clipped at the cap;
# cut at the recipe's 4,096 instead: mean ~2,980, ~31% at the cap (docs/simulator.md, the cost model).
LENGTHS_7B = Lengths.fitted(1024, 424.5, 0.0737)
LENGTHS_1_5B = replace(Lengths.fitted(8192, 3500, 0.042), cap=4096)
# The long-trace recipe (deepscaler-1.5b-16k-h100.yaml) starts from the model as distilled, whose mean
# DeepScaleR's blog gives at the start of its 8K stage: about 5,500 tokens (cut at 8,192); the spreads
# are the fit above's (assumed), the median moved to that mean: cut at 16,384 instead, ~6,300 and ~2.6%.
LENGTHS_1_5B_DISTILLED = replace(LENGTHS_1_5B.with_mean(5500, at_cap=8192), cap=16384)

# name -> (recipe, model, completion lengths, prompt tokens, scale: the recipe's actor counts and batch x k)
SCENARIOS = {
    "1.5b-8": ("qwen2.5-1.5b-h100.yaml", QWEN_1_5B, LENGTHS_1_5B, 150, 1),
    "1.5b-16k": ("deepscaler-1.5b-16k-h100.yaml", QWEN_1_5B, LENGTHS_1_5B_DISTILLED, 150, 1),
    "7b-8": ("qwen2.5-math-7b-grpo-h100.yaml", QWEN_7B, LENGTHS_7B, 300, 1),
    "7b-64": ("qwen2.5-math-7b-grpo-h100.yaml", QWEN_7B, LENGTHS_7B, 300, 8),
    "7b-256": ("qwen2.5-math-7b-grpo-h100.yaml", QWEN_7B, LENGTHS_7B, 300, 32),
}


# steps measured at least, per scenario: the 16K recipe's steps of 70-160 s are long-tailed
# enough that six of them move its samples/s by up to a fifth
MIN_STEPS = {"1.5b-16k": 16}


def scaled(recipe, k: int) -> list[str]:
    """The recipe's generators, learner ranks, reference and scorer actors and prompts per step, x k."""
    r = load(HERE.parent / "configs" / recipe, [])
    sets = [f"generator.num_actors={r.generator.num_actors * k}", f"learner.num_ranks={r.learner.num_ranks * k}",
            f"scorer.num_actors={r.scorer.num_actors * k}", f"grpo.prompts_per_step={r.grpo.prompts_per_step * k}",
            f"reference.num_actors={r.reference.num_actors * k}"]
    return sets


def gpus_of(r) -> int:
    g = r.learner.num_ranks * r.learner.gpus_per_rank
    if not r.colocated:
        g += r.generator.num_actors * r.generator.gpus_per_actor
    if r.reference_actor:
        g += r.reference.num_actors * r.reference.gpus
    return int(round(g))


def predict_one(name: str, sets: list[str], steps: int, seed: int = 0, kv_bound: bool = True) -> dict:
    recipe, model, lengths, prompt_median, k = SCENARIOS[name]
    r = load(HERE.parent / "configs" / recipe, scaled(recipe, k) + sets)
    eta = r.grpo.max_staleness  # (the steps asked for, at least the scenario's MIN_STEPS measured)
    steps = max(steps, MIN_STEPS.get(name, 0) + 2 * eta + 2)
    r = load(HERE.parent / "configs" / recipe, scaled(recipe, k) + sets + [f"grpo.steps={steps}"])
    fleet = Fleet(r, GpuCosts(model, kv_bound=kv_bound), lengths, seed=seed)
    t0 = time.process_time()
    driver, records = run_driver(r, fleet, prompt_tokens=prompt_tokens(prompt_median))
    cpu = time.process_time() - t0
    # after the pipeline filled (eta + 2 steps), before it drains (the last eta steps: the run
    # admits no work beyond its last step)
    steady = records[eta + 2: len(records) - eta]
    step_s = statistics.fmean(x["time/step_s"] for x in steady)
    busy = steady_busy(driver, records, eta + 2, len(records) - eta)
    samples = r.grpo.prompts_per_step * r.grpo.num_generations
    # (the engines of every generator the run had, replacements included)
    engines = [a.device for a in fleet.system.generators.actors if isinstance(a.device, VllmDevice)]
    return {"scenario": name, "sets": sets, "gpus": gpus_of(r), "eta": eta, "step_s": round(step_s, 2),
            "samples_per_s": round(samples / step_s, 2), "busy": busy,
            "completion_len": round(statistics.fmean(x["completion_len/mean"] for x in steady), 1),
            "truncated": round(statistics.fmean(x["completion/truncated_ratio"] for x in steady), 3),
            "sim_cpu_s": round(cpu, 2), **engine_peaks(engines)}


def steady_busy(driver, records: list[dict], first: int, end: int) -> dict:
    """Each group's busy fraction over the steps ``records[first:end]``, from every span the run
    drained (its busy intervals): a mean of the steps' own ``util/*`` keys would weigh a 30-s
    step as a 180-s one."""
    ends = list(itertools.accumulate((x["time/step_s"] for x in records), initial=0.0))
    u = driver.telemetry.utilisation(driver.wall0 + ends[first], driver.wall0 + ends[end])
    return {g: round(1 - u[g]["idle_ratio"], 3) for g in ("generator", "learner", "reference", "scorer") if g in u}


def engine_peaks(engines: list) -> dict:
    """The fullest any vLLM engine's KV cache got (a share of it), its most running and
    waiting sequences, and the preemptions of all of them."""
    if not engines:
        return {}
    return {"kv_peak": round(max(e.peak_kv / e.kv_tokens for e in engines), 3),
            "running_peak": max(e.peak_running for e in engines),
            "waiting_peak": max(e.peak_waiting for e in engines), "preempted": sum(e.preempted for e in engines)}


def predict(args) -> int:
    rows = []
    names = args.only or list(SCENARIOS)
    for name, eta, mode in itertools.product(names, args.etas, args.modes):
        row = predict_one(name, [f"grpo.max_staleness={eta}", f"generator.pause_mode={mode}", *args.set],
                          args.steps + 2 * eta + 2)
        row["partial_rollouts"] = mode == "keep"
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = {(r["scenario"], r["partial_rollouts"]): r["samples_per_s"] for r in rows if r["eta"] == 0}
    lines = ["| recipe | GPUs | η | partial rollouts | s / step | samples/s | vs η=0 | generator busy | learner busy | "
             "reference busy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b0 = base.get((r["scenario"], r["partial_rollouts"]))
        lines.append(f"| {r['scenario']} | {r['gpus']} | {r['eta']} | {'yes' if r['partial_rollouts'] else 'no'} | "
                     f"{r['step_s']:.1f} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / b0:.2f}x | "
                     f"{r['busy'].get('generator', 0):.2f} | {r['busy'].get('learner', 0):.2f} | "
                     f"{r['busy'].get('reference', 0):.2f} |" if b0 else "")
    table = "\n".join(lines)
    print(table)
    results = save_results(args.name, {"steps": args.steps, "sets": args.set, "rows": rows}, table)
    plot(rows, results / f"{args.name}.png")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    """samples/s and generator / learner busy against max_staleness, per scenario."""
    if (plt := pyplot()) is None:
        return
    names = list(dict.fromkeys(r["scenario"] for r in rows))
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 5.6), squeeze=False)
    for k, name in enumerate(names):
        top, bottom = axes[0][k], axes[1][k]
        for partial, style in ((True, "o-"), (False, "s--")):
            mine = sorted((r for r in rows if r["scenario"] == name and r["partial_rollouts"] == partial),
                          key=lambda r: r["eta"])
            if not mine:
                continue
            etas = [r["eta"] for r in mine]
            label = "partial rollouts" if partial else "wait for requests"
            top.plot(etas, [r["samples_per_s"] for r in mine], style, label=label)
            if partial:
                bottom.plot(etas, [r["busy"]["generator"] for r in mine], "o-", label="generator busy")
                bottom.plot(etas, [r["busy"]["learner"] for r in mine], "^-", label="learner busy")
                bottom.plot(etas, [r["busy"].get("reference", 0) for r in mine], "v:", label="reference busy")
        gpus = next(r["gpus"] for r in rows if r["scenario"] == name)
        top.set_title(f"{name} ({gpus} H100s)", fontsize=9)
        top.set_ylabel("samples / s (predicted)", fontsize=8)
        bottom.set_ylim(0, 1.05)
        bottom.set_xlabel("max_staleness η", fontsize=8)
        if k == 0:
            top.legend(fontsize=7)
            bottom.legend(fontsize=7)
    fig.suptitle("Predictions of the fleet simulator (a model, not a measurement: docs/simulator.md)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- what the predictions point at, one change at a time ------------------------------------
FIXES = [  # (label, settings on top of the previous row's)
    ("the 7B recipe x 8, one reference actor (before)", ["reference.num_actors=1"]),
    ("+ a reference per 4 learner ranks (reference.num_actors=8)", ["reference.num_actors=8"]),
    ("+ each completion streamed on its own (completions_per_request=1)", ["grpo.completions_per_request=1"]),
    ("+ GPUs rebalanced: 16 generators, 10 references, 38 learner ranks",
     ["generator.num_actors=16", "reference.num_actors=10", "learner.num_ranks=38", "grpo.prompts_per_step=494"]),
    ("+ generator.max_num_seqs 256 (was 1024)", ["generator.max_num_seqs=256"]),
]


def fixes(args) -> int:
    rows, sets = [], []
    for label, more in FIXES:
        sets = sets + more
        row = {"change": label, "sets": list(sets)}
        for eta in args.etas:
            r = predict_one(args.scenario, sets + [f"grpo.max_staleness={eta}"], args.steps + 2 * eta + 2)
            row[f"eta{eta}"] = r
            print(label, eta, json.dumps(r), flush=True)
        rows.append(row)
    head = " | ".join(f"η={e} samples/s | η={e} generator / learner / reference busy" for e in args.etas)
    lines = [f"| change ({args.scenario}, predicted) | {head} | η=1 vs η=0 |", "|---" * (2 * len(args.etas) + 2) + "|"]
    for row in rows:
        cells = " | ".join(f"{row[f'eta{e}']['samples_per_s']:.0f} | " + " / ".join(
            f"{row[f'eta{e}']['busy'].get(g, 0):.2f}" for g in ("generator", "learner", "reference")) for e in args.etas)
        ratio = row["eta1"]["samples_per_s"] / row["eta0"]["samples_per_s"] if "eta0" in row and "eta1" in row else 0
        lines.append(f"| {row['change']} | {cells} | {ratio:.2f}x |")
    table = "\n".join(lines)
    print(table)
    save_results("simulate_fixes", {"scenario": args.scenario, "rows": rows}, table)
    return 0


# -- the engines' KV caches -----------------------------------------------------------------
def kv(args) -> int:
    """The long-trace recipe's engines against their KV caches: each max_staleness and
    ``generator.max_num_seqs``, with the caches' bound and without it (every sequence fits, as
    the simulator assumed before it modelled them)."""
    rows = []
    for eta, seqs, bound in itertools.product(args.etas, args.max_num_seqs, (True, False)):
        row = predict_one(args.scenario, [f"grpo.max_staleness={eta}", f"generator.max_num_seqs={seqs}"],
                          args.steps + 2 * eta + 2, kv_bound=bound)
        row.update(max_num_seqs=seqs, kv_bound=bound)
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [f"| η | max_num_seqs | KV cache bound | s / step | samples/s | generator busy | fullest KV cache | "
             f"most running | most waiting | preempted ({args.scenario}, predicted) |", "|---" * 10 + "|"]
    for r in rows:
        kv_peak = f"{r['kv_peak']:.0%}" if r["kv_bound"] else "-"
        lines.append(f"| {r['eta']} | {r['max_num_seqs']} | {'yes' if r['kv_bound'] else 'no'} | {r['step_s']:.1f} | "
                     f"{r['samples_per_s']:.2f} | {r['busy']['generator']:.2f} | {kv_peak} | {r['running_peak']} | "
                     f"{r['waiting_peak']} | {r['preempted']} |")
    table = "\n".join(lines)
    print(table)
    save_results(args.name, {"scenario": args.scenario, "rows": rows}, table)
    return 0


# -- elastic generators at scale -------------------------------------------------------------
def elastic_one(name: str, event: str, at: int, steps: int, eta: int, start_s: float) -> dict:
    """``name``'s scenario at max_staleness ``eta`` with one event about learner rank 0's send
    of version ``at``: generator-0 killed 5 s after it (generating) or during it, one
    generator drained (``r1ray scale``) during it, or one added then."""
    recipe, model, lengths, prompt_median, k = SCENARIOS[name]
    sets = scaled(recipe, k) + [f"grpo.max_staleness={eta}", f"grpo.steps={steps}"]
    n = load(HERE.parent / "configs" / recipe, sets).generator.num_actors
    sets += ["generator.min_actors=1", f"generator.max_actors={n + 1}"]
    r = load(HERE.parent / "configs" / recipe, sets)
    fleet = Fleet(r, GpuCosts(model, start_s=start_s), lengths, seed=0)
    seen = {}

    def kill() -> None:
        gens = fleet.system.generators
        seen.update(at_s=round(fleet.tr.t, 1), calls=len(gens.actors[0].calls))
        gens.actors[0].kill()

    def on_send(version: int) -> None:
        if version != at or seen or event == "none":
            return
        seen["at_s"] = round(fleet.tr.t, 1)
        if event == "lost while generating":
            fleet.tr.later(5.0, kill)
        elif event == "lost during a weight sync":
            kill()
        elif event == "drained during a weight sync":
            fleet.driver.elastic.resize(n - 1)
        elif event == "added":
            fleet.driver.elastic.resize(n + 1)

    fleet.on_send = on_send
    fleet.on_driver = lambda driver: setattr(driver.elastic, "target", n)  # (as after `r1ray scale n`)
    driver, records = run_driver(r, fleet, prompt_tokens=prompt_tokens(prompt_median))
    samples = r.grpo.prompts_per_step * r.grpo.num_generations * steps
    return {"scenario": name, "event": event, "eta": eta, "start_s": start_s, "generators": n, **seen,
            "run_s": round(fleet.tr.t, 1), "samples_per_s": round(samples / fleet.tr.t, 2),
            "counts": dict(driver.elastic.counts),
            "requeued": sum(rec.get("groups/requeued", 0) for rec in records)}


ELASTIC_EVENTS = ["none", "lost while generating", "lost during a weight sync", "drained during a weight sync",
                  "added"]


def elastic(args) -> int:
    rows = [elastic_one(args.scenario, e, args.at, args.steps, args.eta, args.start_s) for e in ELASTIC_EVENTS]
    base = rows[0]
    lines = [f"| event ({args.scenario}, η={args.eta}, {args.steps} steps, a start of {args.start_s:.0f} s assumed) | at | "
             "run s | samples/s | vs none | groups generated again | generators lost / replaced / restarted / "
             "added / removed |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        c = row["counts"]
        counts = " / ".join(str(c.get(k, 0)) for k in ("generator/lost", "generator/replaced", "generator/restarted",
                                                          "generators/added", "generators/removed"))
        lines.append(f"| {row['event']} | {row['at_s'] if 'at_s' in row else '-'} s | {row['run_s']:.0f} | "
                     f"{row['samples_per_s']:.1f} | {row['samples_per_s'] / base['samples_per_s']:.3f} | "
                     f"{row['requeued']} | {counts} |")
    table = "\n".join(lines)
    print(table)
    save_results(args.name, {"scenario": args.scenario, "eta": args.eta, "steps": args.steps, "at_version": args.at,
                             "start_s": args.start_s, "rows": rows}, table)
    return 0


# -- colocated against split -----------------------------------------------------------------
def colocated_sets(name: str) -> tuple[list[str], int]:
    """The scenario's GPUs with every learner rank also hosting a vLLM engine (placement.mode
    colocate): the reference actors keep theirs, the rest become ranks, one generator each.
    The overrides, and the ranks."""
    recipe, _, _, _, k = SCENARIOS[name]
    r = load(HERE.parent / "configs" / recipe, scaled(recipe, k))
    ranks = int(gpus_of(r) - (r.reference.num_actors * r.reference.gpus if r.reference_actor else 0))
    prompts = r.grpo.prompts_per_step  # (the batch divides over the ranks: the nearest below)
    while prompts * r.grpo.num_generations % ranks:
        prompts -= 1
    return ["placement.mode=colocate", f"learner.num_ranks={ranks}", f"generator.num_actors={ranks}",
            "grpo.max_staleness=0", f"grpo.prompts_per_step={prompts}"], ranks


def colocate(args) -> int:
    """Each scenario split (η = 0, 1, 2) and colocated (η = 0: the only one it has), the same GPUs."""
    rows = []
    for name in args.only or list(SCENARIOS):
        sets, ranks = colocated_sets(name)
        try:
            row = {"scenario": name, "colocate": {**predict_one(name, sets, args.steps + 2), "ranks": ranks}}
        except ConfigError as e:  # (the long-trace recipe's sequence parallelism does not divide 7 ranks)
            print(f"{name}: no colocated form on its GPUs ({e})", flush=True)
            continue
        for eta in args.etas:
            row[f"split_eta{eta}"] = predict_one(name, [f"grpo.max_staleness={eta}"], args.steps + 2 * eta + 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    busy = "generator / learner / reference busy"
    lines = ["| recipe | GPUs | " + " | ".join(f"split η={e} samples/s" for e in args.etas) +
             f" | split η=0 {busy} | colocated (η=0): ranks = engines | colocated samples/s | colocated {busy} | "
             "colocated vs split η=0 / η=1 |", "|---" * (len(args.etas) + 7) + "|"]
    for row in rows:
        c, s0 = row["colocate"], row["split_eta0"]
        b = lambda x: " / ".join(f"{x['busy'].get(g, 0):.2f}" for g in ("generator", "learner", "reference"))  # noqa: E731
        s1 = row.get("split_eta1")
        vs1 = f"{c['samples_per_s'] / s1['samples_per_s']:.2f}x" if s1 else "-"
        lines.append(f"| {row['scenario']} | {s0['gpus']} | " +
                     " | ".join(f"{row[f'split_eta{e}']['samples_per_s']:.1f}" for e in args.etas) +
                     f" | {b(s0)} | {c['ranks']} | {c['samples_per_s']:.1f} | {b(c)} | "
                     f"{c['samples_per_s'] / s0['samples_per_s']:.2f}x / {vs1} |")
    table = "\n".join(lines)
    print(table)
    save_results("simulate_colocate", {"steps": args.steps, "rows": rows}, table)
    return 0


# -- the driver at scale ---------------------------------------------------------------------
def at_scale(args):
    """The 7B recipe with ``--generators``, ``--ranks``, ``--references`` (a scorer per 8 generators)."""
    sets = [f"generator.num_actors={args.generators}", f"learner.num_ranks={args.ranks}",
            f"scorer.num_actors={args.generators // 8}", f"grpo.prompts_per_step={args.prompts}",
            f"reference.num_actors={args.references}",
            f"grpo.max_staleness={args.eta}", f"grpo.steps={args.steps}", *args.set]
    return load(HERE.parent / "configs" / "qwen2.5-math-7b-grpo-h100.yaml", sets)


def rollout_bytes(fleet: Fleet, prompt_len: int, completion_len: int) -> int:
    """Bytes the driver holds for one completion of ``completion_len`` tokens, unpickled as it
    arrives from a generator (its ids of the simulated generator's type, token ids as a real
    vocabulary's, each a Python int of its own in a list), the group's prompt a share of one
    list, after the reference's log-probs are on it (tracemalloc)."""
    import pickle
    import tracemalloc

    import numpy as np

    n, G = completion_len, fleet.recipe.grpo.num_generations
    arrays = isinstance(fleet.tokens(1), np.ndarray)
    prompt = list(range(1000, 1000 + prompt_len))  # (one list for the group, as the generator's)
    group = [Rollout(f"p/{k}", "p", prompt, (TokenIds.of if arrays else list)(range(1000, 1000 + n)),
                     np.full(n, -0.5, np.float32), [3] * n, "stop") for k in range(G)]
    blob = pickle.dumps(group, protocol=5)
    tracemalloc.start()
    got = pickle.loads(blob)
    for x in got:
        x.ref_logprobs = np.zeros(n, np.float32)
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return size // G


def ray_main_thread_s(c: dict, calls) -> float:
    """Ray's CPU on the calling thread for ``calls``' remote calls and values fetched, at the
    prices ``ray-costs`` measured (``c``): a submit's share, and a round trip's less it for each
    value (the rest runs on Ray's own threads of the driver's process)."""
    main = c["pipeline_round_trip_main_thread_cpu_us"]["one call"] - c["submit_main_thread_cpu_us"]
    return (calls["remote calls"] * c["submit_main_thread_cpu_us"] + calls["ray.get"] * main) / 1e6


def serialise_s(c: dict, calls) -> float:
    """Pickling what ``calls`` counts sent and received: lists' numbers one by one, arrays as a
    buffer each (``ray-costs``' prices, ``c``)."""
    return (calls["numbers sent"] * c["serialise_ns_per_number"]
            + calls["numbers received"] * c["deserialise_ns_per_number"]
            + calls.get("arrays sent", 0) * c["array_serialise_us"] * 1e3
            + calls.get("array numbers sent", 0) * c["array_serialise_ns_per_number"]
            + calls.get("arrays received", 0) * c["array_deserialise_us"] * 1e3
            + calls.get("array numbers received", 0) * c["array_deserialise_ns_per_number"]) / 1e9


def scale_fleet(r) -> Fleet:
    """The simulated fleet ``at_scale``'s recipe ``r`` runs on: the 7B model's H100 costs, its lengths."""
    return Fleet(r, GpuCosts(QWEN_7B), SCENARIOS["7b-64"][2], seed=0)


def run_at_scale(r, costs: dict | None = None):
    """One run of ``at_scale``'s recipe ``r``, its timeline and samples.jsonl written as a run
    writes them: (fleet, driver, records, the run's CPU seconds, the timeline's MB). ``costs`` (``ray-costs``'
    prices): the driver's turns take on the simulated clock what its Python took here, and what
    Ray and pickling take its thread for the calls it made (``SimTransport.charge_driver``);
    None: the driver is free."""
    fleet = scale_fleet(r)
    if costs is not None:
        fleet.tr.charge_driver(lambda cpu_s, calls: cpu_s + ray_main_thread_s(costs, calls) + serialise_s(costs, calls))
    t0 = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        samples = MetricsWriter(Path(tmp), "samples.jsonl")
        driver, records = run_driver(r, fleet, prompt_tokens=prompt_tokens(300), timeline=Path(tmp) / "timeline.json",
                                     samples_log=samples)
        samples.close()
        cpu = time.process_time() - t0
        timeline_mb = (Path(tmp) / "timeline.json").stat().st_size / 2**20
    return fleet, driver, records, cpu, timeline_mb


def steady_step_s(records: list[dict], eta: int) -> float:
    """The mean seconds of the steps after the pipeline filled and before it drains."""
    return statistics.fmean(x["time/step_s"] for x in records[eta + 2: len(records) - eta])


def scale_run(r, eta: int, costs: dict | None = None) -> tuple[float, float]:
    """``run_at_scale``'s steady steps' mean seconds and the driver's thread seconds a step on the clock."""
    fleet, _, records, _, _ = run_at_scale(r, costs)
    return steady_step_s(records, eta), fleet.tr.driver_s / len(records)


def driver_limit(args) -> int:
    """Where one driver stops keeping up: the 7B recipe's proportions at growing fleets (a
    learner rank per 4 generators, a reference per 16, a scorer per 8, 8 prompts a generator
    a step, so a step's seconds stay those of 256 generators), each run twice: the driver
    free, and its thread on the simulated clock (``scale_run``)."""
    costs_file = HERE / "results" / "simulate_ray_costs.json"
    if not costs_file.exists():
        raise SystemExit(f"driver-limit: {costs_file} is missing; run `python benchmarks/simulate.py ray-costs` first")
    c = json.loads(costs_file.read_text())
    rows = []
    for n in args.generators:
        for eta in args.etas:
            managers = [f"grpo.rollout_managers={n // args.per_manager}"] if args.per_manager else []
            sub = argparse.Namespace(generators=n, ranks=max(1, n // 4), references=max(1, n // 16), prompts=8 * n,
                                     eta=eta, steps=args.steps, set=[*args.set, *managers])
            r = at_scale(sub)
            free_s, _ = scale_run(r, eta)
            charged_s, thread_s = scale_run(r, eta, c)
            row = {"generators": n, "learner_ranks": sub.ranks, "prompts_per_step": sub.prompts, "eta": eta,
                   "step_s_driver_free": round(free_s, 2), "step_s_driver_on_clock": round(charged_s, 2),
                   "driver_thread_s_per_step": round(thread_s, 2), "driver_thread_share": round(thread_s / charged_s, 3),
                   "slower": round(charged_s / free_s - 1, 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = ["| generators | learner ranks | prompts a step | η | s / step, driver free | s / step, driver on the clock "
             "| slower | driver's thread, s / step | its share of the step |", "|---" * 9 + "|"]
    lines += [f"| {x['generators']} | {x['learner_ranks']} | {x['prompts_per_step']} | {x['eta']} | "
              f"{x['step_s_driver_free']} | {x['step_s_driver_on_clock']} | {100 * x['slower']:+.1f}% | "
              f"{x['driver_thread_s_per_step']} | {100 * x['driver_thread_share']:.1f}% |" for x in rows]
    table = "\n".join(lines)
    print(table)
    save_results(args.name, {"steps": args.steps, "set": args.set, "per_manager": args.per_manager, "rows": rows},
                 table)
    return 0


def overhead(args) -> int:
    r = at_scale(args)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    driver_cpus = []
    for i in range(args.repeat):  # the same run (seeded): its CPU times vary by a fifth from run to run here
        fleet, driver, records, cpu, timeline_mb = run_at_scale(r)
        driver_cpus.append((cpu - fleet.tr.sim_cpu_s) / len(records))
        if i == 0:  # (the peak is the first run's: later ones reuse its memory)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sim = fleet.tr.sim_cpu_s
    steady = records[args.eta + 2: len(records) - args.eta]
    step_s = steady_step_s(records, args.eta)
    per_step = {k: v / len(records) for k, v in fleet.tr.calls.items()}
    driver_cpu = statistics.median(driver_cpus)
    mean_len = statistics.fmean(x["completion_len/mean"] for x in steady)
    held = rollout_bytes(fleet, 300, round(mean_len))
    ray_s = serial_s = ray_main_s = None
    costs_file = HERE / "results" / "simulate_ray_costs.json"
    if costs_file.exists():  # Ray's own driver-side CPU for those calls, as measured here (ray-costs)
        c = json.loads(costs_file.read_text())
        # (a blocking ray.get outside the completions, a timeline drained or a sync answered: as a completion)
        completions = max(per_step["futures"], per_step.get("ray.get", 0))
        ray_s = (per_step["remote calls"] * c["submit_cpu_us"] + completions * c["future_cpu_us"]) / 1e6
        # of it, on the driver's own thread, the loop's (the rest runs on Ray's threads in its
        # process, beside it on another core): a submit's share, and a round trip's less it
        ray_main_s = ray_main_thread_s(c, {**per_step, "ray.get": completions})
        serial_s = serialise_s(c, per_step)
        # The driver's thread on the clock: a fourth run, each of its turns taking the simulated
        # time its Python, Ray's share of its calls on its thread and their pickling took here.
        charged_step_s, thread_s = scale_run(r, args.eta, c)
        on_clock = {"predicted_step_s_driver_on_clock": round(charged_step_s, 2),
                    "driver_thread_s_per_step_on_clock": round(thread_s, 3),
                    "step_slower_with_driver_on_clock": round(charged_step_s / step_s - 1, 4)}
    out = {"generators": args.generators, "learner_ranks": args.ranks, "prompts_per_step": args.prompts, "set": args.set,
           "eta": args.eta, "steps": len(records), "predicted_step_s": round(step_s, 2),
           "driver_cpu_s_per_step": round(driver_cpu, 3), "driver_cpu_s_per_step_runs": [round(x, 3) for x in driver_cpus],
           "driver_share_of_step": round(driver_cpu / step_s, 4),
           "simulator_cpu_s_per_step": round(sim / len(records), 3), "ray_calls_per_step": per_step,
           "ray_cpu_s_per_step_estimate": None if ray_s is None else round(ray_s, 3),
           "serialisation_cpu_s_per_step_estimate": None if serial_s is None else round(serial_s, 3),
           "driver_ray_and_serialisation_share_of_step":
               None if ray_s is None else round((driver_cpu + ray_s + serial_s) / step_s, 4),
           "ray_main_thread_cpu_s_per_step_estimate": None if ray_main_s is None else round(ray_main_s, 3),
           # the loop's own thread: its Python, Ray's share of each call on it, the pickling
           "driver_main_thread_share_of_step":
               None if ray_s is None else round((driver_cpu + ray_main_s + serial_s) / step_s, 4),
           **({} if ray_s is None else on_clock),
           "peak_rss_mb": round(rss / 1024, 1), "rss_growth_mb": round((rss - rss0) / 1024, 1),
           # what the driver keeps of the actors' spans at the end: those a step may still count, and
           # the run's busy time as merged intervals (16 bytes each); the rest went to the timeline's file
           "spans_kept": len(driver.telemetry.recent), "busy_intervals_kept": driver.telemetry.busy.intervals(),
           "timeline_mb_per_step": round(timeline_mb / len(records), 2),
           # the rollouts of the groups the staleness bound lets be in flight, as the driver holds them
           "rollout_kb_in_driver": round(held / 1024, 1),
           "rollouts_in_flight_mb_estimate": round(held * r.grpo.num_generations * r.grpo.prompts_per_step
                                                   * (r.grpo.max_staleness + 1) / 2**20, 1)}
    if fleet.system.managers is not None:
        out.update(manager_figures(fleet, len(records), step_s, c if costs_file.exists() else None))
    print(json.dumps(out, indent=1))
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in out.items()])
    save_results(args.name, out, table)
    return 0


def manager_figures(fleet: Fleet, steps: int, step_s: float, c: dict | None) -> dict:
    """The rollout managers' side (``grpo.rollout_managers``): each one's Python a step, and the
    busiest one's Ray calls and share of the step, priced as the driver's are (``c``)."""
    managers = fleet.system.managers.actors
    busiest = max(managers, key=lambda m: m.cpu_s)
    calls = {k: v / steps for k, v in busiest.ray_calls.items()}
    out = {"managers": len(managers),
           "manager_cpu_s_per_step": {"mean": round(sum(m.cpu_s for m in managers) / len(managers) / steps, 3),
                                      "max": round(busiest.cpu_s / steps, 3)},
           "busiest_manager_ray_calls_per_step": calls}
    if c is not None:
        completions = max(calls.get("futures", 0), calls.get("ray.get", 0))
        ray_s = (calls.get("remote calls", 0) * c["submit_cpu_us"] + completions * c["future_cpu_us"]) / 1e6
        out["busiest_manager_share_of_step"] = round((busiest.cpu_s / steps + ray_s + serialise_s(c, calls)) / step_s, 4)
    return out


def memory(args) -> int:
    """What the driver holds on to from step to step: ``overhead``'s run under tracemalloc, the
    memory allocated and still held at step ``--steps`` - 1 against step 4, per step, by where
    it was allocated: r1ray's code, the simulator's, or the rest (Python's and numpy's own,
    for either). An object a simulated actor made and the driver kept counts as the
    simulator's; the simulator's own caches grow too (a list of versions per length)."""
    import tracemalloc

    first, last, snaps = 4, args.steps - 1, {}
    if last <= first:
        raise SystemExit(f"memory: --steps {args.steps} leaves nothing to compare; it needs at least {first + 2}")
    r = at_scale(args)
    fleet = scale_fleet(r)

    def on_driver(driver):
        write = driver.metrics.write

        def counted(record):
            write(record)
            if len(driver.metrics.records) in (first, last):
                snaps[len(driver.metrics.records)] = tracemalloc.take_snapshot()
        driver.metrics.write = counted

    fleet.on_driver = on_driver
    tracemalloc.start(1)
    with tempfile.TemporaryDirectory() as tmp:
        driver, _ = run_driver(r, fleet, prompt_tokens=prompt_tokens(300), timeline=Path(tmp) / "timeline.json")
    tracemalloc.stop()
    steps, root = last - first, HERE.parent

    def owner(filename: str) -> str:
        return "simulator" if filename.startswith(str(HERE)) else "r1ray" if filename.startswith(str(root)) else "other"

    grown: dict[str, float] = {}
    sites = []
    for d in snaps[last].compare_to(snaps[first], "lineno"):
        frame = d.traceback[0]
        grown[owner(frame.filename)] = grown.get(owner(frame.filename), 0.0) + d.size_diff
        if owner(frame.filename) != "other":
            sites.append((d.size_diff, f"{Path(frame.filename).resolve().relative_to(root)}:{frame.lineno}"))
    out = {"generators": args.generators, "learner_ranks": args.ranks, "prompts_per_step": args.prompts, "eta": args.eta,
           "steps_between": [first, last],
           "held_kb_per_step": {k: round(v / steps / 1024, 1) for k, v in sorted(grown.items())},
           "largest_sites_kb_per_step": {site: round(size / steps / 1024, 1) for size, site in sorted(sites, reverse=True)[:12]},
           "spans_kept": len(driver.telemetry.recent), "busy_intervals_kept": driver.telemetry.busy.intervals()}
    print(json.dumps(out, indent=1))
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in out.items()])
    save_results(args.name, out, table)
    return 0


def ray_costs(args) -> int:
    """Ray's driver-side CPU on this machine: per actor call submitted; per ``ray.wait``
    (num_returns=1, timeout=0) as a function of the refs pending in it (the driver before
    completion callbacks); per completion through ``ObjectRef.future()`` (``RayWatcher``, now);
    serialising the token lists of a rollout, per number, each way; and a float32 array (a
    completion's log-probs), per array and per element, each way; who pays for a pipeline of two
    calls (an object ref passed on, or an actor calling the next); an item of a streaming call;
    the main thread's share of a submit and of those round trips. Each figure is
    the median of ``--repeat`` runs (this machine's CPU times vary by a third from run to run)."""
    import asyncio
    import pickle

    import numpy as np
    import ray

    from r1ray.cluster.transport import RayWatcher

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")

    @ray.remote(max_concurrency=5000)
    class Echo:
        async def slow(self, x):
            await asyncio.sleep(600)
            return x

        def fast(self, x):
            return x

        def follow(self, other):  # the next actor's handle, given once (passing it with every call costs its owner)
            self.next = other

        async def relay(self, x):  # this actor calls the next one and owns that call
            return await self.next.fast.remote(x)

        def many(self, n):  # a streaming call: each item back as it is yielded
            for i in range(n):  # (not ``yield from``: Ray sends into the generator)
                yield i

    a, b = Echo.remote(), Echo.remote()
    ray.get([a.fast.remote(0), b.fast.remote(0), a.follow.remote(b)])

    def measure() -> dict:
        t0, m0 = time.process_time(), time.thread_time()
        refs = [a.fast.remote(i) for i in range(3000)]
        submit = (time.process_time() - t0) / 3000 * 1e6
        submit_main = (time.thread_time() - m0) / 3000 * 1e6
        ray.get(refs)

        def cpu(work, calls: int = 1000) -> tuple[float, float]:
            """µs of the driver's CPU per ``work(i)``: the process's (every thread), its main thread's."""
            t0, m0 = time.process_time(), time.thread_time()
            for i in range(calls):
                work(i)
            return (time.process_time() - t0) / calls * 1e6, (time.thread_time() - m0) / calls * 1e6

        def stream(calls: int) -> None:
            for item in a.many.options(num_returns="streaming").remote(calls):
                ray.get(item)

        # who pays for a pipeline of two calls: the caller, who owns every call it submits. An
        # object ref passed on as an argument still makes the driver resolve it; an actor that
        # calls the next actor itself owns that call.
        pipeline = {"one call": cpu(lambda i: ray.get(b.fast.remote(i))),
                    "two calls, the first's ref the second's argument": cpu(lambda i: ray.get(b.fast.remote(a.fast.remote(i)))),
                    "two calls, the first actor calling the second": cpu(lambda i: ray.get(a.relay.remote(i)))}
        stream_item = tuple(us / 1000 for us in cpu(lambda _: stream(1000), calls=1))  # (one call, 1,000 items)

        def round_trips(pending: list, futures: bool, calls: int = 1000) -> float:
            """CPU a call costs from submit to its value with ``pending`` refs in flight beside it."""
            watcher = RayWatcher()
            if futures:
                watcher.watch(pending)
            t0 = time.process_time()
            for i in range(calls):
                ref = b.fast.remote(i)
                if futures:
                    watcher.watch([ref])
                    done = []
                    while not done:
                        done = watcher.wait(10.0)
                    watcher.get(done[0])
                else:
                    done = []
                    while not done:
                        done = ray.wait([*pending, ref], num_returns=1, timeout=10.0, fetch_local=True)[0]
                    ray.get(done[0], timeout=0)
            return (time.process_time() - t0) / calls * 1e6

        waits, trips = {}, {}
        for n in (100, 1000, 3000):
            pending = [a.slow.remote(i) for i in range(n)]
            time.sleep(1)
            t0 = time.process_time()
            for _ in range(50):
                ray.wait(pending, num_returns=1, timeout=0)
            waits[n] = (time.process_time() - t0) / 50 * 1e6
            if n in (100, 3000):
                trips[n] = {"ray.wait": round(round_trips(pending, False), 1), "futures": round(round_trips(pending, True), 1)}
            for ref in pending:
                ray.cancel(ref)
        slope = (waits[3000] - waits[100]) / 2900
        wait_base = waits[100] - 100 * slope
        # a completion through a future, in place of a ray.wait and its scan: the round trip with
        # futures, less the ray.wait round trip's cost without the scan
        future = statistics.fmean(t["futures"] for t in trips.values()) - (trips[100]["ray.wait"] - 100 * slope) + wait_base
        rollout = Rollout("p/0", "p", list(range(300)), list(range(1000, 1400)), [-0.5 - i * 1e-4 for i in range(400)],
                          [3] * 200 + [4] * 200, "stop", "x" * 1600, {})  # (versions of two policies: a list, not (version, count))
        n = numbers(rollout)
        t0 = time.process_time()
        for _ in range(2000):
            blob = pickle.dumps(rollout, protocol=5)
        dumps = (time.process_time() - t0) / 2000 / n * 1e9
        t0 = time.process_time()
        for _ in range(2000):
            pickle.loads(blob)
        loads = (time.process_time() - t0) / 2000 / n * 1e9
        arrays = {}  # a float32 array (the reference's log-probs), as one argument of many: per array
        for size in (430, 4096):
            rows = [np.full(size, -0.5, dtype=np.float32) + i for i in range(64)]
            t0 = time.process_time()
            for _ in range(200):
                blob = pickle.dumps(rows, protocol=5)
            dumps_us = (time.process_time() - t0) / 200 / 64 * 1e6
            t0 = time.process_time()
            for _ in range(200):
                pickle.loads(blob)
            arrays[size] = (dumps_us, (time.process_time() - t0) / 200 / 64 * 1e6)
        slopes = [(arrays[4096][k] - arrays[430][k]) / (4096 - 430) for k in (0, 1)]
        return {"submit_cpu_us": round(submit, 1), "submit_main_thread_cpu_us": round(submit_main, 1),
                "pipeline_round_trip_cpu_us": {k: round(v[0], 1) for k, v in pipeline.items()},
                "pipeline_round_trip_main_thread_cpu_us": {k: round(v[1], 1) for k, v in pipeline.items()},
                "streamed_item_cpu_us": round(stream_item[0], 1), "streamed_item_main_thread_cpu_us": round(stream_item[1], 1),
                "wait_cpu_us": waits,
                "wait_base_cpu_us": round(wait_base, 1), "wait_per_ref_cpu_us": round(slope, 3),
                "round_trip_cpu_us": trips, "future_cpu_us": round(future, 1),
                "serialise_ns_per_number": round(dumps, 1), "deserialise_ns_per_number": round(loads, 1),
                "array_serialise_us": round(arrays[430][0] - 430 * slopes[0], 2),
                "array_serialise_ns_per_number": round(slopes[0] * 1e3, 3),
                "array_deserialise_us": round(arrays[430][1] - 430 * slopes[1], 2),
                "array_deserialise_ns_per_number": round(slopes[1] * 1e3, 3)}

    def median(values: list):  # of each figure over the runs (nested: per key)
        if isinstance(values[0], dict):
            return {k: median([v[k] for v in values]) for k in values[0]}
        return round(statistics.median(values), 3)

    runs = [measure() for _ in range(args.repeat)]
    ray.shutdown()
    out = {"ray": ray.__version__, "runs": args.repeat, **median(runs)}
    print(json.dumps(out))
    save_results("simulate_ray_costs", out, "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in out.items()]))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate")
    v.add_argument("--measured", default="runs/sim-validate")
    v.add_argument("--measure", action="store_true", help="run benchmarks/async_vs_sync.py first (--repeat times)")
    v.add_argument("--repeat", type=int, default=3,
                   help="with --measure: runs per max_staleness, into <measured>/run-<k>; each figure is their median")
    v.add_argument("--steps", type=int, default=40)
    v.add_argument("--cores", type=float, default=2.0)
    v.add_argument("--held-out", type=int, nargs="+", default=[2, 4],
                   help="max_staleness values predicted without fitting on them (runs/.../eta-<n> measured)")
    v.add_argument("--fixed", type=float, nargs=4, metavar=("GENERATE", "TRAIN", "REF_LOGPROBS", "BACKGROUND"),
                   help="the cores each kind keeps busy and the background, as fitted before (stop 48: 1.5 1 2 1), "
                        "instead of fitting them on max_staleness 0 and 1")
    v.add_argument("--name", default="simulate_validation", help="stem of the result files in benchmarks/results/")
    sub.add_parser("plot", help="redraw the predictions' plot from benchmarks/results/simulate_predictions.json")
    p = sub.add_parser("predict")
    p.add_argument("--only", nargs="+", choices=list(SCENARIOS))
    p.add_argument("--etas", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--modes", nargs="+", default=["keep", "wait"], choices=["keep", "wait"])
    p.add_argument("--steps", type=int, default=6, help="steps measured (2 x max_staleness + 2 more run)")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--name", default="simulate_predictions")
    f = sub.add_parser("fixes")
    f.add_argument("--scenario", default="7b-64", choices=list(SCENARIOS))
    f.add_argument("--etas", type=int, nargs="+", default=[0, 1, 2])
    f.add_argument("--steps", type=int, default=6)
    c = sub.add_parser("colocate", help="split against colocated (placement.mode colocate), the same GPUs")
    c.add_argument("--only", nargs="+", choices=list(SCENARIOS))
    c.add_argument("--etas", type=int, nargs="+", default=[0, 1, 2])
    c.add_argument("--steps", type=int, default=6)
    e = sub.add_parser("elastic", help="a generator lost, drained or added mid-run, against none")
    e.add_argument("--scenario", default="7b-64", choices=list(SCENARIOS))
    e.add_argument("--eta", type=int, default=1)
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--at", type=int, default=8, help="the event when learner rank 0 sends this version")
    e.add_argument("--start-s", type=float, default=60.0, help="seconds a new generator takes to answer (assumed)")
    e.add_argument("--name", default="simulate_elastic")
    k = sub.add_parser("kv", help="the engines' KV caches: max_num_seqs and max_staleness, with and without their bound")
    k.add_argument("--scenario", default="1.5b-16k", choices=list(SCENARIOS))
    k.add_argument("--etas", type=int, nargs="+", default=[0, 1, 2, 4])
    k.add_argument("--max-num-seqs", type=int, nargs="+", default=[512, 1024])
    k.add_argument("--steps", type=int, default=6, help="steps measured (2 x max_staleness + 2 more run; "
                   "at least the scenario's MIN_STEPS)")
    k.add_argument("--name", default="simulate_kv")
    rc = sub.add_parser("ray-costs", help="Ray's driver-side CPU per call and per wait on this machine")
    rc.add_argument("--repeat", type=int, default=3, help="measure this many times and report each figure's median")
    o = sub.add_parser("overhead")
    mem = sub.add_parser("memory", help="what the driver holds on to from step to step (tracemalloc)")
    dl = sub.add_parser("driver-limit", help="growing fleets, the driver free and on the simulated clock")
    dl.add_argument("--generators", type=int, nargs="+", default=[256, 512, 1024])
    dl.add_argument("--etas", type=int, nargs="+", default=[1])
    dl.add_argument("--steps", type=int, default=7)
    dl.add_argument("--set", action="append", default=[])
    dl.add_argument("--name", default="simulate_driver_limit")
    dl.add_argument("--per-manager", type=int, default=0,
                    help="a rollout manager per this many generators (grpo.rollout_managers); 0: none")
    for q, steps, name in ((o, 7, "simulate_overhead"), (mem, 16, "simulate_memory")):
        q.add_argument("--generators", type=int, default=256)
        q.add_argument("--ranks", type=int, default=64)
        q.add_argument("--references", type=int, default=16)
        q.add_argument("--prompts", type=int, default=2048)
        q.add_argument("--eta", type=int, default=1)
        q.add_argument("--steps", type=int, default=steps)
        q.add_argument("--set", action="append", default=[])
        q.add_argument("--name", default=name)
    o.add_argument("--repeat", type=int, default=3, help="runs; the driver's CPU is their median")
    args = ap.parse_args()
    random.seed(0)
    if args.cmd == "plot":
        rows = json.loads((HERE / "results" / "simulate_predictions.json").read_text())["rows"]
        plot(rows, HERE / "results" / "simulate_predictions.png")
        return 0
    return {"validate": validate, "predict": predict, "fixes": fixes, "overhead": overhead, "colocate": colocate,
            "elastic": elastic, "ray-costs": ray_costs, "memory": memory, "kv": kv,
            "driver-limit": driver_limit}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
