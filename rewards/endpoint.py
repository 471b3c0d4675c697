"""OpenAI-compatible chat endpoints as a reward's judge reaches them: several base URLs, each
with its own limit of requests in flight and of requests per second, every request (retries
included) through those limits, retries with backoff that honour ``Retry-After``, and one
deadline over it all.

The OpenAI client's own retries are off (``max_retries=0``): a retry it made by itself would
pass the rate limit by. Here a 429, a 5xx, a timeout or a dropped connection is retried after
``Retry-After`` (when the answer has one) or an exponential backoff with jitter, and never past
the deadline: a request that cannot finish in time gives up at once instead of sleeping past it.
The API key is given as a value (never read from a file); every error text is scrubbed of it.
"""
from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass


class DeadlineExceeded(Exception):
    """No answer before the deadline (waiting for a slot, the answer itself, or a retry)."""


class RequestFailed(Exception):
    """The endpoint refused the request, or kept failing it after every retry; names the URL."""

    def __init__(self, message: str, url: str = ""):
        super().__init__(message)
        self.url = url


class Malformed(ValueError):
    """A 200 answer that is not what was asked for (no choices, no text, the wrong count):
    retried like a 5xx."""


def scrub(text: str, secrets: list) -> str:
    """``text`` with every secret (an API key, a str or a pydantic SecretStr) replaced by ``***``."""
    for s in secrets:
        s = s.get_secret_value() if hasattr(s, "get_secret_value") else s
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return text


def retry_after_s(error: BaseException) -> float | None:
    """Seconds the server asked to wait (``Retry-After``: seconds or an HTTP date; also
    ``retry-after-ms``), or None when it did not say."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_s(attempt: int, base_s: float = 0.5, cap_s: float = 30.0) -> float:
    """Exponential backoff with jitter: about base·2^attempt, at most cap_s, times 0.5-1.5."""
    return min(cap_s, base_s * 2 ** attempt) * (0.5 + random.random())


class RateLimit:
    """At most ``per_second`` request starts per second, spaced evenly (no bursts): each start
    takes the next free slot. A slot past the deadline is not taken (nobody waits in vain)."""

    def __init__(self, per_second: float | None):
        self.interval = 0.0 if not per_second else 1.0 / per_second
        self.next = 0.0

    async def acquire(self, deadline: float) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        slot = max(now, self.next)
        if slot > deadline:
            raise DeadlineExceeded(f"the next request slot is {slot - now:.1f} s away, past the deadline")
        self.next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


@dataclass
class Endpoint:
    url: str
    client: object  # openai.AsyncOpenAI
    slots: object  # an asyncio.Semaphore, or a null context: no limit
    rate: RateLimit
    in_flight: int = 0


@dataclass
class Counts:
    """What a pool did, since it was made or last drained: HTTP requests sent, retries among
    them, answers 429 (rate limited by the server), and answers that were not completions."""
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    malformed: int = 0

    def drain(self) -> dict:
        out = {"requests": self.requests, "retries": self.retries, "rate_limited": self.rate_limited,
               "malformed": self.malformed}
        self.requests = self.retries = self.rate_limited = self.malformed = 0
        return out


def first_text(resp) -> str:
    """The first choice's text of a chat completion; Malformed when it has none."""
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise Malformed("no choices in the answer")
    text = getattr(getattr(choices[0], "message", None), "content", None)
    if not isinstance(text, str):
        raise Malformed("the answer has no text")
    return text


class EndpointPool:
    """Chat completions over ``urls`` (the distillation client and the judge reward's).

    ``max_concurrency`` and ``requests_per_second`` hold for each URL (None: no limit). A
    request goes to the URL whose next rate slot is the earliest, then the one with the fewest
    requests in flight; its retries go to the same URL (the one that asked to wait)."""

    def __init__(self, urls: list[str], api_key: str | None, *, max_concurrency: int | None,
                 requests_per_second: float | None, timeout_s: float, retries: int):
        from openai import AsyncOpenAI

        if not urls:
            raise ValueError("EndpointPool: no base URL")
        self.key, self.retries = api_key, retries
        self.endpoints = [Endpoint(u, AsyncOpenAI(base_url=u, api_key=api_key or "EMPTY", max_retries=0,
                                                  timeout=timeout_s),
                                   asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext(),
                                   RateLimit(requests_per_second)) for u in urls]
        self.counts = Counts()

    async def close(self) -> None:
        for e in self.endpoints:
            await e.client.close()

    def _pick(self) -> Endpoint:
        return min(self.endpoints, key=lambda e: (e.rate.next, e.in_flight))

    async def chat(self, deadline: float, **request) -> str:
        """The first choice's text of ``chat.completions.create(**request)`` by ``deadline``."""
        return (await self.complete(deadline, first_text, **request))[0]

    async def complete(self, deadline: float = math.inf, parse: Callable = first_text, **request) -> tuple:
        """(``parse(answer)``, the URL that answered) for ``chat.completions.create(**request)``
        by ``deadline`` (time.monotonic(); inf: none). ``parse`` raises Malformed (or a
        ValueError, TypeError, AttributeError, KeyError) for an answer that is not what was
        asked: retried. DeadlineExceeded when it cannot be had in time, RequestFailed when the
        endpoint refused it (4xx other than 408/409/429) or failed every retry."""
        import openai

        attempt, e = 0, self._pick()
        while True:
            try:
                return await self._once(e, deadline, request, parse), e.url
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.BadRequestError,
                    openai.NotFoundError, openai.UnprocessableEntityError) as err:
                raise RequestFailed(self._describe(err, e.url), e.url) from None
            except (openai.APIStatusError, openai.APIConnectionError, openai.APIResponseValidationError,
                    Malformed) as err:
                if isinstance(err, openai.RateLimitError):
                    self.counts.rate_limited += 1
                if isinstance(err, (Malformed, openai.APIResponseValidationError)):
                    self.counts.malformed += 1
                if attempt >= self.retries:
                    raise RequestFailed(f"{self._describe(err, e.url)} (after {attempt + 1} tries)", e.url) from None
                wait = retry_after_s(err)
                wait = backoff_s(attempt) if wait is None else wait
                if time.monotonic() + wait >= deadline:
                    raise DeadlineExceeded(f"{self._describe(err, e.url)}; the retry would be past the deadline") \
                        from None
                await asyncio.sleep(wait)
                attempt += 1
                self.counts.retries += 1

    async def _once(self, e: Endpoint, deadline: float, request: dict, parse: Callable):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("no time left")
        try:
            async with asyncio.timeout(None if math.isinf(remaining) else remaining):
                async with e.slots:
                    await e.rate.acquire(deadline)
                    e.in_flight += 1
                    self.counts.requests += 1
                    try:
                        resp = await e.client.chat.completions.create(**request)
                    except json.JSONDecodeError as err:  # a 200 whose body is not JSON (a proxy's page, cut off)
                        raise Malformed(f"the answer is not JSON: {err}") from None
                    finally:
                        e.in_flight -= 1
        except TimeoutError:
            raise DeadlineExceeded(f"no answer from {e.url} before the deadline") from None
        try:
            return parse(resp)
        except Malformed:
            raise
        except (ValueError, TypeError, AttributeError, KeyError) as err:
            raise Malformed(f"{type(err).__name__}: {err}") from None

    def _describe(self, err: BaseException, url: str) -> str:
        status = getattr(err, "status_code", None)
        what = f"{type(err).__name__} (HTTP {status})" if status else type(err).__name__
        return scrub(f"{what} from {url}: {str(err).strip()[:200]}", [self.key] if self.key else [])
