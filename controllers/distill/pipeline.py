"""Distillation as Open-R1 does it: a distilabel pipeline on Ray sends each prompt to a teacher
behind an OpenAI-compatible endpoint, math-verify keeps the traces whose boxed answer matches the
reference, and the result is written as a dataset ``r1ray sft`` trains on.

The pipeline (``Pipeline(...).ray()``, one Ray actor per step replica)::

    LoadDataFromDisk(pending rows) -> TraceGeneration(EndpointLLM) x client_replicas
                                   -> AnswerCheck (verifier processes) -> Journal

- ``EndpointLLM`` is distilabel's ``OpenAILLM`` spread over several base URLs (the self-hosted
  servers) through the judge reward's client (``rewards/endpoint.py``): each request goes to
  the URL with the fewest requests in flight, under per-URL limits of requests in flight and
  per second that retries pass too; 429s, 5xx answers, timeouts, dropped connections and
  answers that are not valid completions are retried with exponential backoff (honouring
  Retry-After). A request that still fails fails its row only, with the error and the URL
  recorded.
- ``TraceGeneration`` is distilabel's ``TextGeneration`` (Jinja prompt template with
  ``{{ instruction }}``, system prompt, n completions per prompt) whose rows also say why they
  failed, the finish reasons and token counts, and the exact messages sent.
- ``AnswerCheck`` runs ``boxed_math_answer`` in the verifier worker processes (hard time limit).
- ``Journal`` appends one JSON line per row to ``journal.jsonl`` (fsync'd per batch). It is
  the run's memory: a row with a ``done`` record is never generated again, so re-running after
  a crash or Ctrl-C continues where the journal ends, and the outputs are rebuilt from it with
  every row exactly once. Failed rows are reported and tried again by the next run.
"""
import asyncio
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

# distilabel's pydantic models warn about Field(default=None) on import, in every actor.
warnings.filterwarnings("ignore", message="The 'default' attribute with value None")

from distilabel.models.llms import OpenAILLM  # noqa: E402 - after the filter
from distilabel.models.llms.base import AsyncLLM  # noqa: E402
from distilabel.steps import Step, StepInput  # noqa: E402
from distilabel.steps.tasks import TextGeneration  # noqa: E402
from pydantic import Field, PrivateAttr  # noqa: E402

from ...rewards.endpoint import Malformed, scrub  # noqa: E402 - the judge reward's client

# distilabel installs rich tracebacks that print every frame's local variables (an API key
# among them) for any uncaught exception; r1ray's own tracebacks stay plain.
sys.excepthook = sys.__excepthook__

JOURNAL = "journal.jsonl"
ROW = "r1ray_row"  # the row's index in the source split: its identity across runs
GOLD = "r1ray_answer"


def trace_text(content: str | None, reasoning: str | None) -> str | None:
    """The assistant turn as reasoning models write it: the think block (an endpoint's separate
    ``reasoning_content`` / ``reasoning`` field) then the answer; content as-is otherwise."""
    if reasoning and (not content or "<think>" not in content):
        return f"<think>\n{reasoning.strip()}\n</think>\n\n{(content or '').strip()}"
    return content


class EndpointLLM(OpenAILLM):
    """distilabel's OpenAILLM over one or several OpenAI-compatible base URLs, through
    ``rewards.endpoint.EndpointPool`` (the judge reward's client): per-URL limits of requests in
    flight and per second that retries pass too, backoff honouring Retry-After."""

    base_urls: list[str] = Field(default_factory=list)  # empty: base_url
    split_requests: bool = False  # n requests of one completion each (endpoints that ignore n)
    extra_body: dict = Field(default_factory=dict)  # more fields of every request (vLLM's, a provider's)
    max_concurrency: int | None = None  # requests in flight per URL; None: no limit
    requests_per_second: float | None = None  # request starts per second per URL, retries included; None: no limit
    _pool: Any = PrivateAttr(default=None)

    def load(self) -> None:
        from ...rewards.endpoint import EndpointPool

        AsyncLLM.load(self)
        key = self.api_key.get_secret_value() if self.api_key is not None else None
        self._pool = EndpointPool(list(self.base_urls or [self.base_url]), key, max_concurrency=self.max_concurrency,
                                  requests_per_second=self.requests_per_second, timeout_s=self.timeout,
                                  retries=self.max_retries)

    def unload(self) -> None:
        self._pool = None
        super().unload()

    def _secrets(self) -> list[str]:
        return [self.api_key.get_secret_value()] if self.api_key is not None else []

    async def _complete(self, messages: list, n: int, max_new_tokens: int, temperature: float,
                        top_p: float) -> tuple[tuple[list[str], list[str | None], list[int]], str]:
        """((texts, finish reasons, [completion tokens]), the URL that answered)."""

        def parse(resp):
            choices = getattr(resp, "choices", None)
            if not isinstance(choices, list) or len(choices) != n:
                raise Malformed(f"expected {n} choices, got "
                                f"{len(choices) if isinstance(choices, list) else type(resp).__name__}")
            texts, reasons = [], []
            for ch in sorted(choices, key=lambda c: getattr(c, "index", 0) or 0):
                msg = ch.message
                extra = getattr(msg, "model_extra", None) or {}
                reasoning = extra.get("reasoning_content") or extra.get("reasoning")
                text = trace_text(msg.content, reasoning if isinstance(reasoning, str) else None)
                if not isinstance(text, str):
                    raise Malformed("a choice has no content")
                texts.append(text)
                reasons.append(ch.finish_reason)
            usage = getattr(resp, "usage", None)
            return texts, reasons, [int(getattr(usage, "completion_tokens", 0) or 0) if usage is not None else 0]

        return await self._pool.complete(parse=parse, model=self.model, messages=messages, n=n,
                                         max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                         extra_body=self.extra_body or None)

    async def agenerate(self, input, num_generations: int = 1, max_new_tokens: int = 128,  # type: ignore[override]
                        temperature: float = 1.0, top_p: float = 1.0) -> dict:
        from ...rewards.endpoint import RequestFailed

        try:
            if self.split_requests:
                parts = await asyncio.gather(*[self._complete(input, 1, max_new_tokens, temperature, top_p)
                                               for _ in range(num_generations)])
                texts = [t for (p, _) in parts for t in p[0]]
                reasons = [r for (p, _) in parts for r in p[1]]
                tokens = [sum(t for (p, _) in parts for t in p[2])]
                url = parts[-1][1]
            else:
                (texts, reasons, tokens), url = await self._complete(input, num_generations, max_new_tokens,
                                                                     temperature, top_p)
            return {"generations": texts, "finish_reasons": reasons, "completion_tokens": tokens[0], "error": None,
                    "url": url, "statistics": {"input_tokens": [0], "output_tokens": tokens}}
        except Exception as e:  # noqa: BLE001 - the row fails, with why and where; the run goes on
            what = str(e) if isinstance(e, RequestFailed) else f"{type(e).__name__}: {str(e).strip()[:300]}"
            return {"generations": None, "finish_reasons": None, "completion_tokens": 0,
                    "error": scrub(what, self._secrets()), "url": getattr(e, "url", ""),
                    "statistics": {"input_tokens": [0], "output_tokens": [0]}}


class TraceGeneration(TextGeneration):
    """TextGeneration whose rows keep every generation of a prompt together, with the messages
    sent, the finish reasons, the completion tokens, and the error of a row that failed."""

    @property
    def outputs(self) -> list[str]:
        return ["generations", "finish_reasons", "completion_tokens", "error", "prompt_messages", "model_name"]

    def process(self, inputs: StepInput):  # type: ignore[override]
        formatted = self._format_inputs(inputs)
        outs = self.llm.generate_outputs(inputs=formatted, num_generations=self.num_generations,
                                         **self.llm.get_generation_kwargs())
        rows = []
        for row, messages, out in zip(inputs, formatted, outs):
            rows.append({**row, "generations": out.get("generations"), "finish_reasons": out.get("finish_reasons"),
                         "completion_tokens": out.get("completion_tokens", 0), "error": out.get("error"),
                         "prompt_messages": messages, "model_name": self.llm.model_name})
        yield rows


class AnswerCheck(Step):
    """math-verify of each generation's boxed answer against the row's reference, in verifier
    worker processes with a hard time limit (rewards.isolation.VerifierPool)."""

    reward: str = "boxed_math_answer"
    timeout_s: float = 10.0
    workers: int = 1
    _pool: Any = PrivateAttr(default=None)

    @property
    def inputs(self) -> list[str]:
        return ["generations", GOLD, ROW]

    @property
    def outputs(self) -> list[str]:
        return ["correct", "answers"]

    def load(self) -> None:
        from ...rewards.isolation import VerifierPool, auto_memory_mb

        super().load()
        self._pool = VerifierPool(self.workers, self.timeout_s, memory_mb=auto_memory_mb(self.workers))

    def unload(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        super().unload()

    def process(self, inputs: StepInput):  # type: ignore[override]
        flat, golds, where, ids = [], [], [], []
        for i, row in enumerate(inputs):
            row["correct"], row["answers"] = None, None
            gens = row.get("generations")
            if row.get("error") or not gens:
                continue
            row["correct"], row["answers"] = [None] * len(gens), [None] * len(gens)
            for j, g in enumerate(gens):
                flat.append(g or "")
                golds.append(row[GOLD])
                where.append((i, j))
                ids.append(f"row {row[ROW]}/{j}")
        if flat:
            res = self._pool.score(self.reward, {}, flat, {"answer": golds}, sample_ids=ids)
            for (i, j), score, answer in zip(where, res.scores, res.answers or [None] * len(flat)):
                inputs[i]["correct"][j] = None if score is None else score > 0
                inputs[i]["answers"][j] = answer
        yield inputs


def journal_record(row: dict, verify: bool) -> dict:
    """The journal line of one row: ``done`` with its generations, or ``failed`` with why."""
    rec = {"row": int(row[ROW]), "t": round(time.time(), 3)}
    gens = row.get("generations")
    error = row.get("error")
    if not error and gens is None:
        error = "the generation step failed on this row's batch (see .distilabel/ pipeline.log)"
    if not error and verify and row.get("correct") is None:
        error = "the answer check failed on this row's batch (see .distilabel/ pipeline.log)"
    if error:
        rec.update(status="failed", error=str(error))
        return rec
    rec.update(status="done", prompt_messages=row.get("prompt_messages"), generations=list(gens),
               finish_reasons=row.get("finish_reasons"), completion_tokens=int(row.get("completion_tokens") or 0),
               model_name=row.get("model_name"))
    if verify:
        rec.update(correct=row.get("correct"), answers=row.get("answers"))
    return rec


class Journal(Step):
    """Appends each row's record to the journal, one fsync per batch; the leaf of the pipeline."""

    path: str
    verify: bool = True

    @property
    def inputs(self) -> list[str]:
        return [ROW]

    @property
    def outputs(self) -> list[str]:
        return [ROW]

    def process(self, inputs: StepInput):  # type: ignore[override]
        lines = "".join(json.dumps(journal_record(row, self.verify), ensure_ascii=False) + "\n" for row in inputs)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        yield [{ROW: int(row[ROW])} for row in inputs]


# -- the journal, read back -------------------------------------------------------------------

def repair_journal(path: Path) -> int:
    """Cut a last line left half-written by a killed run (so the next append starts on a line of
    its own); returns the bytes cut. Reads only the file's tail."""
    if not path.exists():
        return 0
    with open(path, "r+b") as f:
        size = pos = f.seek(0, os.SEEK_END)
        end = 0
        while pos > 0:
            step = min(1 << 16, pos)
            f.seek(pos - step)
            i = f.read(step).rfind(b"\n")
            if i >= 0:
                end = pos - step + i + 1
                break
            pos -= step
        if end < size:
            f.truncate(end)
        return size - end


def read_journal(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(done, failed) records by row. A row's first ``done`` record is the one kept (a later
    duplicate, which a correct run never writes, is ignored); ``failed`` holds the rows whose
    latest try failed and that have no done record."""
    done: dict[int, dict] = {}
    failed: dict[int, dict] = {}
    if not path.exists():
        return done, failed
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            row = rec.get("row")
            if not isinstance(row, int):
                continue
            if rec.get("status") == "done":
                done.setdefault(row, rec)
                failed.pop(row, None)
            elif row not in done:
                failed[row] = rec
    return done, failed


def kept_indices(rec: dict, verify: bool, keep: str) -> list[int]:
    """The generations of a done row that go into the SFT dataset."""
    gens = rec.get("generations") or []
    if verify:
        idx = [j for j, ok in enumerate(rec.get("correct") or []) if ok]
    else:
        idx = [j for j, g in enumerate(gens) if g]
    return idx[:1] if keep == "first" else idx
