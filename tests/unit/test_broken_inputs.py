"""Every way a data file or path can be unreadable, through every reader (GRPO and SFT data,
evaluation tasks, distillation prompts): refused with `r1ray: invalid config: ...`, exit 2,
naming the key, the file and, where there is one, the line; never a traceback. All of them
are refused before Ray or any actor starts (`r1ray check`, and `r1ray eval`'s task loading)."""
import contextlib
import gzip
import io
import json
import os
import re

import pytest

from r1ray.controllers.cli import main

GOOD = {"problem": "1+1", "solution": "\\boxed{2}", "answer": "2"}


def _line(row) -> str:
    return json.dumps(row) + "\n"


def _saved(path, damage):
    import datasets

    datasets.DatasetDict({s: datasets.Dataset.from_dict({k: [v] * n for k, v in GOOD.items()})
                          for s, n in (("train", 400), ("test", 40))}).save_to_disk(str(path))
    arrow = next((path / "train").glob("*.arrow"))
    damage(arrow)


# name -> (how to make it, what the message must say besides the key and the file)
BROKEN = {
    "bad_utf8.jsonl": (lambda p: p.write_bytes(_line(GOOD).encode() + b'{"problem": "\xff\xfe"}\n'),
                       r"line 2, byte 14 of the line is not UTF-8"),
    "not_json.jsonl": (lambda p: p.write_text(_line(GOOD) + "{not json\n"), "line 2 is not JSON"),
    "list_line.jsonl": (lambda p: p.write_text(_line(GOOD) + "[1, 2]\n"), "line 2 is a JSON list, not an object"),
    "blank.jsonl": (lambda p: p.write_text("\n\n"), "no rows"),
    "empty.jsonl": (lambda p: p.write_text(""), "no rows", "data.train_split"),  # the split it would be
    "gzip_cut.jsonl": (lambda p: p.write_bytes(gzip.compress(_line(GOOD).encode() * 50)[:40]), "cannot be read to its end"),
    "scalar.json": (lambda p: p.write_text("42"), "holds a JSON int"),
    "empty_list.json": (lambda p: p.write_text("[]"), "an empty list: no rows"),
    "trailing.json": (lambda p: p.write_text(json.dumps([GOOD]) + "xx"), "line 1, column"),
    "mixed_list.json": (lambda p: p.write_text(json.dumps([GOOD, 3])), "item 1 of the list is a JSON int"),
    "latin1.csv": (lambda p: p.write_bytes(b"problem,solution,answer\n\xe9t\xe9,1,1\n"), "line 2, byte 1"),
    "extra_fields.csv": (lambda p: p.write_text("problem,solution,answer\n1,2,3\n1,2,3,4,5\n"),
                         "line 3 has 5 fields, the header 3"),
    "binary.parquet": (lambda p: p.write_bytes(b"PAR1 not really"), "not a readable Parquet file"),
    "notes.txt": (lambda p: p.write_text("hello"), "is a .txt file"),
    "fifo.jsonl": (lambda p: os.mkfifo(p), r"is a FIFO \(named pipe\), neither a folder nor a file"),
    "dangling.jsonl": (lambda p: p.symlink_to(p.parent / "nowhere.jsonl"), "does not exist"),
    "loop.jsonl": (lambda p: p.symlink_to(p), "does not exist"),
    "empty_dir": (lambda p: p.mkdir(), r"failed|could not be loaded"),
    "mixed_dir": (lambda p: (p.mkdir(), (p / "train.jsonl").write_text(_line(GOOD)),
                             (p / "test.csv").write_text("problem,solution,answer\n1,2,3\n")), "mixes data files"),
    "split_is_dir": (lambda p: (p.mkdir(), (p / "train.jsonl").mkdir()), r"failed|could not be loaded"),
    "cut_arrow": (lambda p: _saved(p, lambda a: open(a, "r+b").truncate(a.stat().st_size // 2)), r"failed|could not be loaded"),
    "zeroed_arrow": (lambda p: _saved(p, lambda a: a.write_bytes(b"\0" * a.stat().st_size)), r"failed|could not be loaded"),
}

READERS = {  # each reader's command (given the file and a model) and the key it names
    "grpo": (lambda p, m: ["check", "tiny-cpu", "--set", f"data.path={p}", "--set", "sft.steps=0",
                           "--set", "sft.stop_at_pass_rate=null"], "data.path"),
    "sft": (lambda p, m: ["check", "tiny-cpu", "--set", f"data.path={p}"], "data.path"),
    "eval": (lambda p, m: ["eval", "tiny-cpu", "--set",
                           "eval.tasks=" + json.dumps([{"task": "generic", "path": str(p)}])], "eval.tasks[0].path"),
    # the shipped recipe's teacher is the demo's checkpoint: a fresh clone has the tiny model instead
    "distill": (lambda p, m: ["check", "tiny-distill", "--distill", "--set", f"data.path={p}",
                              "--set", f"distill.serve.model={m}"], "data.path"),
}


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken")
    for name, (make, *_) in BROKEN.items():
        make(folder / name)
    return folder


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_data_input_is_refused_by_name(broken, name, reader, tiny_model):
    args, key = READERS[reader]
    if len(BROKEN[name]) > 2 and key == "data.path":
        key = BROKEN[name][2]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(args(broken / name, tiny_model))  # an exception escaping here is the traceback a user would see
    message = err.getvalue().strip().splitlines()[-1]
    assert rc == 2, message
    assert message.startswith("r1ray: invalid config: ") and f"'{key}'" in message, message
    assert name in message and re.search(BROKEN[name][1], message), message
