"""r1ray sft through the CLI: bad conversations refused naming row and column, an empty split
refused, an interrupted run resumed to the same final loss."""
import pytest
import r1ray_cli


# -- r1ray sft: bad data is refused before anything starts -----------------------------------------
def _sft_cli(*args, env_extra=None):
    return r1ray_cli.run("sft", *args, extra_env=env_extra)


def _write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}


@pytest.mark.parametrize("rows,match", [
    ([GOOD, {"text": "no messages"}], None),  # a missing column: named with the columns there are
    ([GOOD, {"messages": [{"role": "user", "content": "1+1"}, {"role": "user", "content": "and?"}]}],
     r"split 'train' \(data.train_split\) row 1, column 'messages' \(data.messages_column\): the last message's "
     r"role is 'user', not 'assistant'"),
    ([GOOD, {"messages": []}], r"row 1, column 'messages'.*not a non-empty list"),
])
def test_bad_conversations_are_refused_naming_the_row_and_column(tmp_path, tiny_world, rows, match):
    data = tmp_path / "data"
    data.mkdir()
    if match is None:  # one file without the column at all
        _write_jsonl(data / "train.jsonl", [{"text": "a"}, {"text": "b"}])
        match = r"config key 'data.messages_column': got 'messages'; accepted: a column of split 'train'.*it has: text"
    else:
        _write_jsonl(data / "train.jsonl", rows)
    out = tmp_path / "run"
    proc = _sft_cli("configs/tiny-cpu.yaml", "--output-dir", str(out), "--set", f"data.path={data}",
                    "--set", f"model.tiny_dir={tiny_world}", "--set", "sft.steps=2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert __import__("re").search(match, proc.stderr), proc.stderr[-2000:]
    assert not out.exists()  # refused before the run directory was made


def test_an_empty_split_is_refused(tmp_path, tiny_world):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("")
    proc = _sft_cli("configs/tiny-cpu.yaml", "--output-dir", str(tmp_path / "run"), "--set", f"data.path={data}",
                    "--set", f"model.tiny_dir={tiny_world}", "--set", "sft.steps=2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config key 'data.train_split': split 'train'" in proc.stderr and "has no rows" in proc.stderr


# -- r1ray sft end to end: packing, token-budget micro-batches, held-out loss, HF checkpoints, an
# interrupted run resumed ------------------------------------------------------------------------
def _sft_cmd(out, tiny_world, *extra):

    return r1ray_cli.cmd("sft", "configs/tiny-cpu.yaml", "--output-dir", str(out),
            "--set", f"model.tiny_dir={tiny_world}", "--set", "ray.dashboard=false", "--set", "sft.steps=12",
            "--set", "sft.batch_size=32", "--set", "sft.packing=true", "--set", "sft.max_seq_length=256",
            "--set", "sft.schedule=cosine", "--set", "sft.warmup_steps=2", "--set", "sft.min_lr_ratio=0.1",
            "--set", "sft.eval_every=6", "--set", "sft.eval_examples=32", "--set", "checkpoint.every_steps=3",
            "--set", "checkpoint.keep_last=2", "--set", "learner.max_tokens_per_micro_batch=512", *extra)


def _records(out):
    import json

    return [json.loads(line) for line in (out / "sft_metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(900)
def test_an_interrupted_sft_run_resumes_to_the_same_final_loss(tmp_path, tiny_world):
    import json
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    whole = tmp_path / "whole"
    proc = subprocess.run(_sft_cmd(whole, tiny_world), capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = _records(whole)
    assert [r["step"] for r in want] == list(range(1, 13))
    assert [r["step"] for r in want if "eval_loss" in r] == [6, 12]
    assert want[-1]["loss"] < want[0]["loss"] and want[-1]["eval_loss"] < want[5]["eval_loss"]
    assert all(0 <= r["padding_waste"] < 0.5 and r["rows"] < 32 for r in want)  # 32 conversations, packed
    assert want[1]["lr"] == pytest.approx(1e-3) and want[-1]["lr"] == pytest.approx(1e-4, rel=0.05)  # cosine to 0.1
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 12
    assert summary["truncated"] == {"examples": 0, "tokens_lost": 0, "dropped_rows": 0}
    assert summary["tokens_per_s"] > 0 and summary["final_eval_loss"] == want[-1]["eval_loss"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for ckpt in [whole / "checkpoint-sft", whole / "checkpoints" / "step-000009" / "hf"]:
        AutoModelForCausalLM.from_pretrained(ckpt)
        AutoTokenizer.from_pretrained(ckpt)
    assert [p.name for p in sorted((whole / "checkpoints").glob("step-*"))] == ["step-000006", "step-000009"]

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_sft_cmd(cut, tiny_world), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    t0 = time.monotonic()
    while not ((cut / "sft_metrics.jsonl").exists() and len((cut / "sft_metrics.jsonl").read_text().splitlines()) >= 5):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() - t0 < 300, "the run never reached step 5"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no clean-up at all
    proc.wait()
    written = len(_records(cut))
    assert 5 <= written < 12
    proc = subprocess.run(_sft_cmd(cut, tiny_world, "--resume", "auto"), capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] in (3, 6, 9)
    got = _records(cut)
    assert [r["step"] for r in got] == list(range(1, 13))  # the records after the checkpoint were redone once
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert a.get("eval_loss") == pytest.approx(b.get("eval_loss"), rel=1e-5) if "eval_loss" in b else True
