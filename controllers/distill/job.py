"""``r1ray distill RECIPE``: a reasoning-trace dataset from a teacher model, as Open-R1 made
OpenR1-Math (see ``pipeline.py`` beside it).

The output directory (``output_dir``) is the dataset being built; running the command again
continues it:

- ``journal.jsonl``: one record per prompt row tried (done with its generations, or failed
  with why); rows done are never generated again.
- ``distilled.jsonl`` (or ``.parquet``): every done row with all its generations, their finish
  reasons, math-verify verdicts and extracted answers.
- ``dataset/``: a ``datasets.load_from_disk`` folder (train, and test when ``distill.test_size``)
  of the kept traces as ``messages`` (the prompt as sent, then the teacher's answer with its
  think block): ``r1ray sft RECIPE --set data.path=<output_dir>/dataset`` trains on it.
- ``summary.json``: rows done / failed (with their errors), generations kept and dropped,
  requests/s and tokens/s of this run; ``config.yaml``; ``servers/*.log`` when self-hosted.

The API key is read from the environment variable ``distill.api_key_env`` names, inside this
process only; it is not in the recipe, the run directory, the logs or the errors (every error
text that reaches a file or the terminal is scrubbed of it).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from ...actors import storage as store
from ...actors.server import VllmServer
from ..common import interrupt
from ..common.runlog import read_json, write_json_atomic
from ..config import Recipe, dump, env_secret
from ..config.schema import ConfigError
from .pipeline import GOLD, JOURNAL, ROW, kept_indices, read_journal, repair_journal, scrub

log = logging.getLogger("r1ray")

# The keys that decide what a row's generations are: a journal written under other values is
# another dataset, and is not continued (the endpoint's URL and the client's knobs may change).
SAME_DATASET_KEYS = ("model", "prompt_template", "system_prompt", "temperature", "top_p", "max_new_tokens",
                     "num_generations", "extra_body", "split", "prompt_column")


class EndpointError(RuntimeError):
    """The teacher endpoint cannot be used (nothing answers, or it refuses the key); names the URL."""


def api_key(recipe: Recipe):
    """The key from the environment variable the recipe names, as a pydantic SecretStr (shown as
    ********** wherever it is printed); refused when that variable is unset."""
    name = recipe.distill.api_key_env
    return None if name is None else env_secret(name, "distill.api_key_env")


def teacher(recipe: Recipe) -> tuple[str, str | None, Path | None]:
    """(the model name sent in requests, the model the servers load or None, the tiny world's dir)."""
    from ..common.data import _looks_local
    from ..common.job import prepare_model

    d = recipe.distill
    tiny_dir = None
    if d.serve is None:
        if recipe.data.path == "tiny":
            _, tiny_dir = prepare_model(recipe)
        return d.model, None, tiny_dir
    served = d.serve.model or recipe.model.path
    if served != "tiny" and Path(served).expanduser().exists():
        served = str(Path(served).expanduser().resolve())  # the server actor's working directory is not ours
    elif served != "tiny" and _looks_local(served):
        raise ConfigError(f"config key 'distill.serve.model': got {served!r}, which does not exist; accepted: a model "
                          "folder (an HF checkpoint, e.g. a run's checkpoint-final) or a hub model name")
    if served == "tiny" or recipe.data.path == "tiny":
        model_path, tiny_dir = prepare_model(dataclasses.replace(recipe, model=dataclasses.replace(
            recipe.model, path=served)))
        served = model_path if served == "tiny" else served
    return d.model or served, served, tiny_dir


def load_prompts(recipe: Recipe, tiny_dir: Path | None):
    """(the source split, its prompt column, its answer column or None), checked row by row:
    a row without a prompt (or without a reference, when filtering) is refused by number."""
    from ..common.data import load_dataset_dict

    d = recipe.distill
    split = d.split or recipe.data.train_split
    ds = load_dataset_dict(recipe.data, tiny_dir)
    if split not in ds:
        raise ConfigError(f"config key 'distill.split': got {split!r}; accepted: a split of {recipe.data.path} "
                          f"({', '.join(ds)})")
    source = ds[split]
    prompt_col = d.prompt_column or recipe.data.prompt_column
    answer_col = d.answer_column if d.filter == "math_verify" else None
    for key, col in (("distill.prompt_column", prompt_col), ("distill.answer_column", answer_col)):
        if col is not None and col not in source.column_names:
            raise ConfigError(f"config key '{key}': got {col!r}; accepted: a column of split {split!r} of "
                              f"{recipe.data.path} (it has: {', '.join(source.column_names)})"
                              + ("; or distill.filter 'none' (no rejection sampling)" if key.endswith("answer_column") else ""))
    n = len(source) if d.max_rows is None else min(d.max_rows, len(source))
    if n == 0:
        raise ConfigError(f"config key 'distill.split': split {split!r} of {recipe.data.path} has no rows; accepted: a "
                          "split with prompts")
    for col, key in ((prompt_col, "distill.prompt_column"), (answer_col, "distill.answer_column")):
        if col is None:
            continue
        values = source.select_columns([col])[:n][col]
        bad = [i for i, v in enumerate(values) if v is None or not str(v).strip()]
        if bad:
            raise ConfigError(f"split {split!r} of {recipe.data.path}, column {col!r} ({key}): rows {bad[:10]} "
                              f"{'and more ' if len(bad) > 10 else ''}are empty; accepted: a non-empty value in every row "
                              "(drop those rows from the data, or set distill.max_rows)")
    return source.select(range(n)) if n < len(source) else source, prompt_col, answer_col


def fingerprint(recipe: Recipe, model_name: str) -> dict:
    d = recipe.distill
    out = {k: getattr(d, k) for k in SAME_DATASET_KEYS}
    out.update(model=model_name, split=d.split or recipe.data.train_split,
               prompt_column=d.prompt_column or recipe.data.prompt_column, data_path=recipe.data.path,
               data_name=recipe.data.name)
    return out


def check_same_dataset(out: Path, fp: dict) -> None:
    """A journal left by a run with other generation settings is not continued."""
    saved = read_json(out / "distill.json")
    if saved is None:
        if (out / JOURNAL).exists():
            raise ConfigError(f"output_dir {str(out)!r} has a journal.jsonl but no distill.json; accepted: the output "
                              "directory of an r1ray distill run, or a new one")
        if out.exists() and any(p.name not in ("config.yaml",) for p in out.iterdir()):
            raise ConfigError(f"output_dir {str(out)!r} is not empty and holds no distillation; accepted: a new or empty "
                              "directory, or one that r1ray distill wrote (to continue it)")
        return
    changed = {k: (saved.get("fingerprint", {}).get(k), v) for k, v in fp.items() if saved.get("fingerprint", {}).get(k) != v}
    if changed:
        what = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changed.items())
        raise ConfigError(f"output_dir {str(out)!r} continues a distillation made with other settings ({what}); "
                          "accepted: the same settings (to continue it), or a new output_dir")


def preflight(url: str, key, timeout_s: float) -> None:
    """Something answers at ``url`` and takes the key: else EndpointError naming the URL (before
    any row is sent). Busy answers (429, 5xx) pass: the requests retry those."""
    import httpx

    headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
    last = None
    for attempt in range(3):
        try:
            r = httpx.get(url.rstrip("/") + "/models", headers=headers, timeout=min(30.0, timeout_s))
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {scrub(str(e), [key] if key else [])[:200]}"
            time.sleep(1.0 + attempt)
            continue
        if r.status_code in (401, 403):
            raise EndpointError(f"the endpoint {url} refused the API key (HTTP {r.status_code}); accepted: a valid key in "
                                "the environment variable distill.api_key_env names")
        return
    raise EndpointError(f"the endpoint {url} (distill.base_url) does not answer: {last}; accepted: the URL of a running "
                        "OpenAI-compatible API")


def start_servers(recipe: Recipe, served: str, name: str, out: Path):
    """The self-hosted teacher: ``serve.replicas`` VllmServer actors in placement groups of
    their own (one node's GPUs each), started together; (urls, group, placement)."""
    from ...cluster.placement import Placement
    from ..common.system import DISTILL, placement_plan, server_group

    s = recipe.distill.serve
    placement = Placement(placement_plan(recipe, DISTILL), recipe.ray.namespace, recipe.ray.placement_timeout_s)
    group = None
    try:
        group = server_group("teacher", s, served, name, out / "servers", recipe.seed, recipe.distill.api_key_env,
                             recipe.ray.namespace, placement.strategy)
        t0 = time.perf_counter()
        urls = group.run_all(VllmServer.wait_ready, timeout_s=s.startup_timeout_s + 60)
        log.info("teacher: %d vLLM server(s) of %s ready in %.0f s: %s", len(urls), served, time.perf_counter() - t0,
                 ", ".join(urls))
        return urls, group, placement
    except BaseException:
        stop_servers(group, placement)
        raise


def stop_servers(group, placement) -> None:
    from ..common.system import stop_server_group

    if group is not None:
        stop_server_group(group)
    if placement is not None:
        placement.remove()


def run_pipeline(recipe: Recipe, out: Path, pending: list[int], source, prompt_col: str, answer_col: str | None,
                 urls: list[str], model_name: str, key) -> bool:
    """The distilabel pipeline on Ray over the pending rows; True when it was stopped (Ctrl-C)."""
    import datasets
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDisk, StepResources

    from .pipeline import AnswerCheck, EndpointLLM, Journal, TraceGeneration

    d = recipe.distill
    pending_dir = out / ".pending"
    shutil.rmtree(pending_dir, ignore_errors=True)
    prompts = source.select_columns([prompt_col])[pending][prompt_col] if pending else []
    golds = source.select_columns([answer_col])[pending][answer_col] if answer_col else [""] * len(pending)
    datasets.Dataset.from_dict({ROW: pending, "instruction": [str(p) for p in prompts],
                                GOLD: [str(g) for g in golds]}).save_to_disk(str(pending_dir))
    verify = answer_col is not None
    # The prompt loader and the journal read and write output_dir from their actors: on a
    # multi-node cluster it is on the volume every node mounts (as checkpoints are).
    with Pipeline(name=f"{recipe.ray.namespace}-distill", cache_dir=str(out / ".distilabel")).ray() as pipeline:
        load = LoadDataFromDisk(name="prompts", dataset_path=str(pending_dir), batch_size=d.input_batch_size)
        llm = EndpointLLM(model=model_name, base_url=urls[0], base_urls=urls, api_key=key, max_retries=d.retries,
                          timeout=d.timeout, split_requests=d.split_requests, extra_body=d.extra_body,
                          # the endpoint's limits, split among the client replicas (one client each)
                          max_concurrency=None if d.max_concurrency is None else
                          max(1, d.max_concurrency // d.client_replicas),
                          requests_per_second=None if d.requests_per_second is None else
                          d.requests_per_second / d.client_replicas,
                          generation_kwargs={"max_new_tokens": d.max_new_tokens, "temperature": d.temperature,
                                             "top_p": d.top_p})
        gen = TraceGeneration(name="generate", llm=llm, template=d.prompt_template, system_prompt=d.system_prompt,
                              num_generations=d.num_generations, input_batch_size=d.input_batch_size,
                              resources=StepResources(replicas=d.client_replicas))
        journal = Journal(name="journal", path=str(out / JOURNAL), verify=verify, input_batch_size=d.input_batch_size)
        if verify:
            check = AnswerCheck(name="verify", timeout_s=recipe.scorer.timeout_s,
                                workers=recipe.scorer.workers_per_actor, input_batch_size=d.input_batch_size)
            load >> gen >> check >> journal
        else:
            load >> gen >> journal
    saved = signal.getsignal(signal.SIGINT)
    stops: list[int] = []
    stop = pipeline._stop  # what distilabel's Ctrl-C handler calls (its own flag is reset before run returns)

    def counted_stop() -> None:
        stops.append(1)
        stop()

    pipeline._stop = counted_stop
    try:
        pipeline.run(use_cache=False)
    except SystemExit:  # a second Ctrl-C: distilabel's handler exits at once
        raise KeyboardInterrupt("SIGINT") from None
    finally:
        signal.signal(signal.SIGINT, saved)  # distilabel's own handler stops the pipeline, then stays
    return bool(stops)


def write_outputs(out: Path, recipe: Recipe, source, prompt_col: str, answer_col: str | None, n_rows: int,
                  done: dict[int, dict], failed: dict[int, dict]) -> dict:
    """distilled.jsonl/.parquet and dataset/ rebuilt from the journal's records (``read_journal``:
    each row exactly once); the counts."""
    import datasets

    d = recipe.distill
    verify = answer_col is not None
    rows = sorted(r for r in done if r < n_rows)
    full, sft_rows = [], []
    counts = dict(generations=0, correct=0, unverifiable=0, no_answer=0, truncated=0)
    for r in rows:
        rec = done[r]
        src = source[r]
        gens = rec.get("generations") or []
        correct = rec.get("correct") if verify else None
        counts["generations"] += len(gens)
        counts["truncated"] += sum(1 for x in rec.get("finish_reasons") or [] if x == "length")
        if verify:
            counts["correct"] += sum(1 for x in correct or [] if x)
            counts["unverifiable"] += sum(1 for x in correct or [] if x is None)
            counts["no_answer"] += sum(1 for a in rec.get("answers") or [] if a is None)
        full.append({**{k: v for k, v in src.items()}, "source_row": r, "prompt_messages": rec.get("prompt_messages"),
                     "generations": gens, "finish_reasons": rec.get("finish_reasons"),
                     "completion_tokens": rec.get("completion_tokens"), "model_name": rec.get("model_name"),
                     **({"correct": correct, "answers": rec.get("answers")} if verify else {})})
        for j in kept_indices(rec, verify, d.keep):
            sft_rows.append({"messages": list(rec.get("prompt_messages") or []) + [{"role": "assistant",
                                                                                    "content": gens[j]}],
                             prompt_col: str(src[prompt_col]), **({answer_col: str(src[answer_col])} if verify else {}),
                             "source_row": r, "generation_index": j, "model_name": rec.get("model_name") or ""})
    # The flat file: written beside, then renamed (a reader never sees half of it).
    flat = out / f"distilled.{d.output_format}"
    tmp = out / f".{flat.name}.tmp"
    if d.output_format == "jsonl":
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in full:
                f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
    else:
        datasets.Dataset.from_list(full).to_parquet(str(tmp)) if full else tmp.write_bytes(b"")
    os.replace(tmp, flat)
    # The SFT dataset: the last test_size problems with kept traces are the test split.
    problems = sorted({x["source_row"] for x in sft_rows})
    test_rows = set(problems[len(problems) - d.test_size:]) if d.test_size and len(problems) > d.test_size else set()
    cols = ["messages", prompt_col, *([answer_col] if verify else []), "source_row", "generation_index", "model_name"]

    def table(items):
        return datasets.Dataset.from_dict({c: [x[c] for x in items] for c in cols})

    splits = {"train": table([x for x in sft_rows if x["source_row"] not in test_rows])}
    if test_rows:
        splits["test"] = table([x for x in sft_rows if x["source_row"] in test_rows])
    dd = datasets.DatasetDict(splits)
    tmp_dir, final_dir = out / ".dataset.tmp", out / "dataset"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    dd.save_to_disk(str(tmp_dir))
    shutil.rmtree(final_dir, ignore_errors=True)
    os.replace(tmp_dir, final_dir)
    failed_rows = sorted(r for r in failed if r < n_rows and r not in done)
    report = {"rows": n_rows, "rows_done": len(rows), "rows_failed": len(failed_rows),
              "rows_pending": n_rows - len(rows) - len(failed_rows),
              "failed": [{"row": r, "error": failed[r].get("error")} for r in failed_rows[:50]],
              **counts, "kept": len(sft_rows), "problems_kept": len(problems),
              "dropped": counts["generations"] - (counts["correct"] if verify else counts["generations"]),
              "train_rows": len(splits["train"]), "test_rows": len(splits.get("test", [])),
              "filter": "math_verify (boxed answer)" if verify else "none", "outputs": {"flat": str(flat),
                                                                                      "dataset": str(final_dir)}}
    report["hub"] = push(dd, d) if d.push_to_hub else None
    return report


def push(dd, d) -> dict:
    """The dataset to the hub when a token exists; otherwise said so (never an error: the local
    dataset is the result)."""
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:  # noqa: BLE001 - no hub client: no token
        token = None
    if not token:
        log.warning("distill.push_to_hub=%s: not pushed, no hub token (set HF_TOKEN or run `hf auth login`)",
                    d.push_to_hub)
        return {"repo": d.push_to_hub, "pushed": False, "why": "no hub token"}
    try:
        dd.push_to_hub(d.push_to_hub, private=d.private, token=token)
    except Exception as e:  # noqa: BLE001 - the local dataset stands; the push can be redone
        log.warning("distill.push_to_hub=%s failed: %s", d.push_to_hub, scrub(str(e), [token])[:300])
        return {"repo": d.push_to_hub, "pushed": False, "why": scrub(str(e), [token])[:300]}
    return {"repo": d.push_to_hub, "pushed": True, "private": d.private}


def this_run(done: dict[int, dict], failed: dict[int, dict], since: float, until: float, d) -> dict:
    """Requests, tokens and their rates over the rows this invocation journaled (records from
    ``since`` on), over the seconds from ``since`` to ``until``."""
    done = [r for r in done.values() if r.get("t", 0) >= since]
    failed_now = sum(1 for r in failed.values() if r.get("t", 0) >= since)
    requests = len(done) * (d.num_generations if d.split_requests else 1)
    tokens = sum(int(r.get("completion_tokens") or 0) for r in done)
    seconds = max(1e-9, until - since)
    return {"rows_done": len(done), "rows_failed": failed_now, "requests": requests,
            "completion_tokens": tokens, "generate_s": round(seconds, 2), "requests_per_s": round(requests / seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1)}


def sample_table(done: dict[int, dict], source, prompt_col: str, limit: int = 20) -> list[dict]:
    """The first ``limit`` rows done, one table row each: the prompt, the first generation with
    its finish reason, extracted answer and verdict (None when the data has no answers)."""
    rows = []
    for r in sorted(r for r in done if r < len(source))[:limit]:
        rec = done[r]
        gens = rec.get("generations") or [""]
        rows.append({"row": r, "prompt": str(source[r][prompt_col]), "generation": gens[0],
                     "finish_reason": (rec.get("finish_reasons") or [None])[0],
                     "answer": (rec.get("answers") or [None])[0], "correct": (rec.get("correct") or [None])[0],
                     "generations": len(gens), "completion_tokens": rec.get("completion_tokens")})
    return rows


def distill_job(recipe: Recipe) -> dict:
    """The whole ``r1ray distill`` job; returns the summary (also in summary.json)."""
    import datasets

    datasets.disable_progress_bars()  # a bar per small save otherwise; the pipeline logs its progress
    from ...cluster import runtime
    from ..common.job import (
        check_output_dir,
        connect,
        end_trackers,
        ended,
        signals_ignored,
        start_trackers,
        trackers_ready,
    )
    from ..common.system import DISTILL

    t_start = time.perf_counter()
    d = recipe.distill
    out = Path(recipe.output_dir).expanduser().resolve()  # absolute: the pipeline's actors write there
    check_output_dir(recipe)
    tracker_names = trackers_ready(recipe)
    key = api_key(recipe)
    secrets = [key] if key else []
    model_name, served, tiny_dir = teacher(recipe)
    source, prompt_col, answer_col = load_prompts(recipe, tiny_dir)
    fp = fingerprint(recipe, model_name)
    check_same_dataset(out, fp)
    done, failed = read_journal(out / JOURNAL)  # (a line cut by a kill is skipped, then repaired below)
    n_rows = len(source)
    pending = [i for i in range(n_rows) if i not in done]
    if pending and d.serve is None:
        preflight(d.base_url, key, d.timeout)  # a dead endpoint fails before anything is written or started
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "distill.json", {"fingerprint": fp})
    dump(recipe, out / "config.yaml")
    cut = repair_journal(out / JOURNAL)
    mirror = store.Mirror(out, recipe.storage.sync_every_s)  # on object storage: the journal uploaded as it grows
    if cut:
        log.warning("journal.jsonl: a last line cut short by a kill (%d bytes) was removed", cut)
    trackers = start_trackers(recipe, out, tracker_names, "distill")  # a continued dataset: the same tracker run
    summary: dict = {"output_dir": str(out), "status": "running", "teacher": model_name,
                     "endpoint": "self-hosted vLLM" if d.serve else d.base_url, "rows": n_rows,
                     "already_done": n_rows - len(pending), "retrying_failed": sum(1 for r in failed if r < n_rows)}
    log.info("distill: %d rows, %d done already, %d to generate (%d failed before), %d generations each, teacher %s",
             n_rows, n_rows - len(pending), len(pending), summary["retrying_failed"], d.num_generations, model_name)
    group = placement = None
    started_ray = False
    since, finished = time.time(), None
    try:
        if pending:
            on_gpu = bool(d.serve and d.serve.gpus_per_replica > 0)
            connect(recipe, DISTILL, on_gpu)
            started_ray = True
            interrupt.install()
            if d.serve is not None:
                urls, group, placement = start_servers(recipe, served, model_name, out)
            else:
                urls = [d.base_url]
            since = time.time()
            stopped = run_pipeline(recipe, out, pending, source, prompt_col, answer_col, urls, model_name, key)
            finished = time.time()
            if stopped:
                raise KeyboardInterrupt("SIGINT")
    except BaseException as e:
        finished = finished or time.time()
        ended(summary, e, out)
        if "error" in summary:
            summary["error"] = scrub(summary["error"], secrets)
        raise
    finally:
        with signals_ignored():
            stop_servers(group, placement)
            if started_ray:
                runtime.stop()
            done_all, failed_all = read_journal(out / JOURNAL)  # read once, for both
            if pending:
                summary["this_run"] = this_run(done_all, failed_all, since, finished or time.time(), d)
            report = write_outputs(out, recipe, source, prompt_col, answer_col, n_rows, done_all, failed_all)
            summary.update(report)
            if summary["status"] == "running":
                summary["status"] = "completed" if not report["rows_failed"] and not report["rows_pending"] \
                    else "incomplete"
            summary["wall_s"] = round(time.perf_counter() - t_start, 2)
            rows = sample_table(done_all, source, prompt_col)
            trackers.table("distilled/samples", json.loads(scrub(json.dumps(rows, default=str), secrets)), step=0)
            end_trackers(trackers, out, summary)  # the numbers only: no text reaches a tracker
            write_json_atomic(out / "summary.json", json.loads(scrub(json.dumps(summary, default=str), secrets)))
            mirror.close()
    return summary
