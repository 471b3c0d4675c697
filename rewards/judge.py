"""``judge``: a reward graded by an LLM behind an OpenAI-compatible endpoint (a hosted API, or
the vLLM servers ``r1ray train`` starts for ``serve:``), for answers math-verify cannot check.

Each completion becomes one chat request rendered from a Jinja ``template`` (``problem``,
``completion``, ``reference``, ``columns``); the judge's answer becomes a score by a parser: a
``regex`` whose first group is a number, ``choices`` (the last of the listed verdicts that
appears, as a whole word, wins), or a plug-in function ``parser`` ("pkg.mod:fn", text -> float
or None). ``score_range: [lo, hi]`` maps a number in it onto [0, 1] (one outside is invalid).

It is built for judges that stall training: every request (retries included) passes a limit of
``max_concurrency`` requests in flight and ``requests_per_second`` per endpoint URL; 429s,
5xx, timeouts and dropped connections are retried with backoff honouring ``Retry-After``; one
scoring call never runs past ``deadline_s``; whatever has no verdict by then scores None and is
counted (``timeouts``), as are failed requests (``errors``) and unparseable verdicts
(``invalid``). Verdicts are cached by (judge, request): the same completion of the same problem
is graded once (a group's duplicate completions, a prompt seen again).

In a scorer actor (``actors/scorer.py``) the judge runs in the actor's process, beside the
verifier workers, with the limits split evenly among ``scorer.num_actors``: the endpoint sees
at most what the recipe says in total. Called directly (TRL's convention) it reads the API key
from the environment variable ``api_key_env`` names, and uses the limits whole.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from ._content import text_of
from .endpoint import DeadlineExceeded, EndpointPool, RequestFailed, scrub
from .plugins import import_callable

DEFAULT_TEMPLATE = """You are grading a student's answer to a problem against the reference answer.

Problem:
{{ problem }}

Reference answer:
{{ reference }}

Student's answer:
{{ completion }}

Is the student's final answer equivalent to the reference answer? Reply with one word: CORRECT or INCORRECT."""
DEFAULT_CHOICES = {"CORRECT": 1.0, "INCORRECT": 0.0}
TEMPLATE_VARIABLES = ("problem", "completion", "reference", "columns")
_EXAMPLE_CHARS = 200


@dataclass
class JudgeResult:
    """One scoring call: a score or None per completion, the indices of each kind of failure
    (all scored None), the first failure as an example, and the call's counts."""
    scores: list[float | None]
    errors: list[int] = field(default_factory=list)
    invalid: list[int] = field(default_factory=list)
    timeouts: list[int] = field(default_factory=list)
    first_error: str = ""
    counts: dict = field(default_factory=dict)  # requests, retries, rate_limited, malformed, cached


class Judge:
    """The ``judge`` reward (see the module). ``open(api_key, share)`` starts its client (a
    scorer does; a direct call opens it with the key from the environment), ``score`` grades
    a batch under the deadline, ``close`` stops the client."""

    group_relative = False
    concurrent = True  # the scorer runs it in its own process, not in a verifier worker

    def __init__(self, *, model: str | None = None, base_url: str | None = None, base_urls: list | None = None,
                 api_key_env: str | None = None, serve: dict | None = None, template: str = DEFAULT_TEMPLATE,
                 system_prompt: str | None = None, reference_column: str = "solution", strip_thinking: bool = True,
                 regex: str | None = None, choices: dict | None = None, parser: str | None = None,
                 score_range: list | None = None, max_concurrency: int = 8, requests_per_second: float | None = None,
                 timeout_s: float = 60.0, retries: int = 3, deadline_s: float = 120.0, max_tokens: int = 256,
                 temperature: float = 0.0, extra_body: dict | None = None, cache_size: int = 100_000):
        import jinja2
        import jinja2.meta

        urls = list(base_urls or []) + ([base_url] if base_url else [])
        if not urls and serve is None:
            raise ValueError("judge needs an endpoint: base_url (or base_urls), or serve (vLLM servers r1ray starts)")
        if urls and serve is not None:
            raise ValueError("judge takes base_url/base_urls or serve, not both")
        if serve is not None and not isinstance(serve, dict):
            raise ValueError(f"judge serve must be a mapping of vLLM server settings, got {serve!r}")
        if not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls):
            raise ValueError(f"judge base_url(s) must be http(s) URLs, got {urls!r}")
        if serve is None and not model:
            raise ValueError("judge model: the model name sent in requests is required with base_url")
        given = {"regex": regex, "choices": choices, "parser": parser}
        parsers = [p for p, v in given.items() if v is not None]
        if len(parsers) > 1:
            raise ValueError(f"judge takes one parser, got {', '.join(parsers)}; accepted: regex, choices or parser")
        self.regex = self.choices = self.parse_fn = None
        if regex is not None:
            try:
                self.regex = re.compile(regex)
            except re.error as e:
                raise ValueError(f"judge regex {regex!r} does not compile: {e}") from None
            if self.regex.groups < 1:
                raise ValueError(f"judge regex {regex!r} needs a group around the number, e.g. 'Score: ([0-9.]+)'")
        elif parser is not None:
            self.parse_fn = import_callable(parser, "judge parser")
        else:
            choices = DEFAULT_CHOICES if choices is None else choices
            if not isinstance(choices, dict) or not choices or not all(
                    isinstance(k, str) and k.strip() and _is_number(v) for k, v in choices.items()):
                raise ValueError(f"judge choices must map verdict words to numbers, e.g. {DEFAULT_CHOICES}; got "
                                 f"{choices!r}")
            self.choices = {k.strip().lower(): float(v) for k, v in choices.items()}
            words = sorted(self.choices, key=len, reverse=True)
            self.choice_re = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, words)) + r")(?!\w)", re.IGNORECASE)
        if score_range is not None and not (isinstance(score_range, (list, tuple)) and len(score_range) == 2 and
                                            all(map(_is_number, score_range)) and score_range[0] < score_range[1]):
            raise ValueError(f"judge score_range must be [low, high] with low < high, got {score_range!r}")
        for key, value, low in (("max_concurrency", max_concurrency, 1), ("retries", retries, 0),
                                ("max_tokens", max_tokens, 1), ("cache_size", cache_size, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"judge {key} must be an integer >= {low}, got {value!r}")
        for key, value in (("timeout_s", timeout_s), ("deadline_s", deadline_s)):
            if not _is_number(value) or value <= 0:
                raise ValueError(f"judge {key} must be a number of seconds > 0, got {value!r}")
        if requests_per_second is not None and (not _is_number(requests_per_second) or requests_per_second <= 0):
            raise ValueError(f"judge requests_per_second must be > 0 (or null: no limit), got {requests_per_second!r}")
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        try:
            used = jinja2.meta.find_undeclared_variables(env.parse(template))
            self.template = env.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"judge template does not parse: {e} (line {e.lineno})") from None
        if unknown := sorted(used - set(TEMPLATE_VARIABLES)):
            raise ValueError(f"judge template uses {', '.join(map(repr, unknown))}; accepted: "
                             f"{', '.join(TEMPLATE_VARIABLES)} (columns.<name>: any dataset column)")
        self.uses_reference = "reference" in used
        self.model, self.urls, self.api_key_env, self.serve = model, urls, api_key_env, serve
        self.system_prompt, self.reference_column, self.strip_thinking = system_prompt, reference_column, strip_thinking
        self.score_range = None if score_range is None else (float(score_range[0]), float(score_range[1]))
        self.max_concurrency, self.requests_per_second = max_concurrency, requests_per_second
        self.timeout_s, self.retries, self.deadline_s = float(timeout_s), retries, float(deadline_s)
        self.sampling = {"max_tokens": max_tokens, "temperature": float(temperature)}
        self.extra_body = dict(extra_body or {})
        self.cache_size = cache_size
        self.cache: OrderedDict[str, float] = OrderedDict()
        # Who the judge is, for the cache key: another model, template or parser is another judge.
        self.identity = json.dumps([model, template, system_prompt, regex, choices, parser, score_range, self.sampling,
                                    self.extra_body, strip_thinking, reference_column], sort_keys=True, default=str)
        self._key: str | None = None
        self._share = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: EndpointPool | None = None
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self, api_key: str | None = None, share: int = 1) -> "Judge":
        """Start the client: ``api_key`` (default: from ``api_key_env``), the limits divided by
        ``share`` (the scorer actors that use this endpoint at once)."""
        if not self.urls:
            raise RuntimeError("judge with serve: its vLLM servers are started by r1ray train; give base_url to call it "
                               "directly")
        if api_key is None and self.api_key_env:
            api_key = os.environ.get(self.api_key_env, "").strip()
            if not api_key:
                raise RuntimeError(f"judge api_key_env: the environment variable {self.api_key_env} is not set")
        self.close()
        self._key, self._share = api_key, max(1, int(share))
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="r1ray-judge", daemon=True).start()
        rps = None if self.requests_per_second is None else self.requests_per_second / self._share
        # (its semaphores bind to the loop that first uses them: this one)
        self._pool = EndpointPool(self.urls, api_key, max_concurrency=max(1, self.max_concurrency // self._share),
                                  requests_per_second=rps, timeout_s=self.timeout_s, retries=self.retries)
        return self

    def close(self, wait: bool = True) -> None:
        """Stop the client; ``wait``: close its connections first (up to 10 s)."""
        if self._loop is None:
            return
        loop, pool, self._loop, self._pool = self._loop, self._pool, None, None
        if wait:
            try:
                asyncio.run_coroutine_threadsafe(pool.close(), loop).result(timeout=10)
            except Exception:  # noqa: BLE001 - closing a client that is gone already
                pass
        loop.call_soon_threadsafe(loop.stop)

    def __del__(self):
        try:
            self.close(wait=False)  # at interpreter exit the loop's thread may be gone: never wait on it
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- TRL's convention ------------------------------------------------------------------------

    def __call__(self, completions: list, **kwargs) -> list[float | None]:
        if self._loop is None:
            self.open()
        return self.score(completions, kwargs).scores

    # -- grading ---------------------------------------------------------------------------------

    def messages(self, completion, prompt, row: dict) -> list[dict]:
        """The chat request for one completion: the rendered template (and the system prompt)."""
        reference = row.get(self.reference_column)
        if self.uses_reference and self.reference_column not in row:
            raise KeyError(f"the dataset has no column {self.reference_column!r} (judge reference_column); "
                           f"columns: {', '.join(sorted(row)) or 'none'}")
        text = self.template.render(problem=_problem_text(prompt), completion=self._answer_text(completion),
                                    reference="" if reference is None else str(reference), columns=row)
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": text}]

    def parse(self, text: str) -> float | None:
        """The verdict's score; ValueError when the text has none (or it is outside score_range)."""
        if self.parse_fn is not None:
            value = self.parse_fn(text)
            if value is None:
                return None
        elif self.regex is not None:
            found = self.regex.findall(text)
            if not found:
                raise ValueError(f"no match of {self.regex.pattern!r}")
            last = found[-1]
            value = last[0] if isinstance(last, tuple) else last
        else:
            found = self.choice_re.findall(text)
            if not found:
                raise ValueError(f"none of {', '.join(map(repr, self.choices))}")
            value = self.choices[found[-1].lower()]
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not finite")
        if self.score_range is not None:
            low, high = self.score_range
            if not low <= value <= high:
                raise ValueError(f"{value:g} is outside score_range [{low:g}, {high:g}]")
            value = (value - low) / (high - low)
        return value

    def score(self, completions: list, columns: dict, sample_ids: list[str] | None = None) -> JudgeResult:
        """Grade every completion within ``deadline_s``; thread-safe (calls take turns)."""
        n = len(completions)
        ids = [str(i) for i in range(n)] if sample_ids is None else list(sample_ids)
        prompts = columns.get("prompts") or [None] * n
        rows = [{k: v[i] for k, v in columns.items() if k not in ("prompts", "completion_ids")} for i in range(n)]
        result = JudgeResult(scores=[None] * n)
        if not n:
            return result
        with self._lock:
            if self._loop is None:
                self.open()
            future = asyncio.run_coroutine_threadsafe(self._grade(completions, prompts, rows, ids, result), self._loop)
            try:
                future.result(timeout=self.deadline_s + 30)  # the deadline is enforced inside; this is a backstop
            except TimeoutError:
                future.cancel()
        for indices in (result.errors, result.invalid, result.timeouts):
            indices.sort()
        return result

    async def _grade(self, completions, prompts, rows, ids, result: JudgeResult) -> None:
        deadline = time.monotonic() + self.deadline_s
        pool = self._pool
        pool.counts.drain()
        cached = 0
        tasks: dict[str, asyncio.Task] = {}  # request key -> its task (duplicates share one)
        which: list[tuple[int, str]] = []
        for i, completion in enumerate(completions):
            try:
                messages = self.messages(completion, prompts[i], rows[i])
            except Exception as e:  # noqa: BLE001 - a bad row fails its own completion
                self._fail(result, i, ids, result.errors, f"cannot render the judge's request: {type(e).__name__}: {e}")
                continue
            key = hashlib.sha256((self.identity + json.dumps(messages, sort_keys=True)).encode()).hexdigest()
            if key in self.cache:
                self.cache.move_to_end(key)
                result.scores[i] = self.cache[key]
                cached += 1
                continue
            if key not in tasks:
                request = {"model": self.model, "messages": messages, **self.sampling}
                if self.extra_body:
                    request["extra_body"] = self.extra_body
                tasks[key] = asyncio.ensure_future(pool.chat(deadline, **request))
            which.append((i, key))
        if tasks:
            await asyncio.wait(tasks.values(), timeout=max(0.0, deadline - time.monotonic()))
        for i, key in which:
            task = tasks[key]
            if not task.done():
                task.cancel()
                self._fail(result, i, ids, result.timeouts, f"no verdict within deadline_s={self.deadline_s:g}")
                continue
            error = task.exception()
            if isinstance(error, DeadlineExceeded):
                self._fail(result, i, ids, result.timeouts, f"no verdict within deadline_s={self.deadline_s:g}: {error}")
            elif error is not None:
                what = str(error) if isinstance(error, RequestFailed) else f"{type(error).__name__}: {error}"
                self._fail(result, i, ids, result.errors, what)
            else:
                text = task.result()
                try:
                    score = self.parse(text)
                except Exception as e:  # noqa: BLE001 - a plug-in parser may raise anything
                    self._fail(result, i, ids, result.invalid, f"cannot read a score from the verdict "
                               f"{_clip(text)!r}: {type(e).__name__}: {e}")
                    continue
                result.scores[i] = score
                if score is not None and self.cache_size:
                    self.cache[key] = score
                    if len(self.cache) > self.cache_size:
                        self.cache.popitem(last=False)
        await asyncio.gather(*tasks.values(), return_exceptions=True)  # the cancelled ones finish cancelling
        result.counts = {**pool.counts.drain(), "cached": cached}

    def _fail(self, result: JudgeResult, i: int, ids: list, bucket: list, what: str) -> None:
        bucket.append(i)
        result.scores[i] = None
        if not result.first_error:
            result.first_error = scrub(f"sample {ids[i]!r}: {_clip(what, 300)}", [self._key] if self._key else [])

    def _answer_text(self, completion) -> str:
        if isinstance(completion, list):  # conversational: the last assistant turn (an episode ends with tools too)
            completion = [m for m in completion if isinstance(m, dict) and m.get("role") == "assistant"]
        text = text_of(completion)
        if self.strip_thinking and "<think>" in text:
            _, closed, after = text.partition("</think>")
            text = after.strip() if closed else ""  # a trace cut inside its thinking has no answer yet
        return text


def _problem_text(prompt) -> str:
    if isinstance(prompt, list):  # conversational: the last user turn
        users = [m.get("content") or "" for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return "" if prompt is None else str(prompt)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _clip(text: str, n: int = _EXAMPLE_CHARS) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 3] + "..."
