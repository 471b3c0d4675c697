"""Tools the policy calls while it reasons, and the worker pool that runs them.

A tool is a Python function with type hints and a docstring whose ``Args:`` section describes
each parameter (transformers' ``get_json_schema`` convention, as TRL's tool-calling GRPO), named
in the recipe by import path (``package.module:function``) like a reward plug-in, or built in:
``python`` (runs a program in the reward sandbox: CPU, memory, process, time and network
limits) and ``calculator``. The policy calls one in Qwen2.5's format::

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "123 * 456"}}
    </tool_call>

Calls run in spawned worker processes, never in the generator's own: each call has a wall-clock
limit (a worker that overruns is killed and replaced) and its text is cut to a size. A call
that cannot be parsed, names an unknown tool, raises, hangs or dies gives the policy an error
text (counted), never a crash.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly (integers and fractions stay exact).

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. "123 * 456 + 7"
    """
    import ast
    from fractions import Fraction

    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: Fraction(a) / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(str(node.value)) if isinstance(node.value, float) else node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            base, exp = ev(node.left), ev(node.right)
            if not (isinstance(exp, int) or (isinstance(exp, Fraction) and exp.denominator == 1)) or abs(exp) > 1000:
                raise ValueError("exponents must be integers of at most 1000")
            if abs(base) > 1 and abs(exp) * math.log10(abs(base)) > 4000:
                raise ValueError("the result would have more than 4000 digits")
            return Fraction(base) ** int(exp)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")

    if len(expression) > 1000:
        raise ValueError("the expression is longer than 1000 characters")
    value = ev(ast.parse(expression.strip(), mode="eval"))
    if isinstance(value, Fraction):
        return str(value.numerator) if value.denominator == 1 else f"{value} (= {float(value):.10g})"
    return str(value)


def python(code: str) -> str:
    """Run a Python program in a sandbox (no network, limited CPU time and memory) and return what it prints.

    Args:
        code: the program; print what you need to see
    """
    from ..rewards.sandbox import run_python

    res = run_python(code)
    if res.timed_out:
        raise TimeoutError("the program ran out of time")
    if res.returncode != 0:
        raise RuntimeError(f"exit status {res.returncode}\n{res.stderr.strip()[-2000:]}")
    return res.stdout


BUILT_IN = {"python": f"{__name__}:python", "calculator": f"{__name__}:calculator"}


def load(spec: str):
    """The function a recipe's tool entry names: a built-in name or ``package.module:function``.
    Raises ValueError naming the entry and what is accepted."""
    from ..rewards.plugins import import_callable

    path = BUILT_IN.get(spec, spec)
    if ":" not in path:
        raise ValueError(f"tool {spec!r}: accepted: {', '.join(BUILT_IN)} or an import path 'package.module:function'")
    return import_callable(path, "tool", spec)


def schemas(specs: list[str]) -> list[dict]:
    """The JSON schemas the chat template renders (``tools=``), from each function's type hints
    and docstring. Raises ValueError naming a tool transformers cannot describe."""
    from transformers.utils import get_json_schema

    out = []
    for spec in specs:
        try:
            out.append(get_json_schema(load(spec)))
        except ValueError:
            raise
        except Exception as e:  # transformers' DocstringParsingException / TypeHintParsingException
            raise ValueError(f"tool {spec!r} cannot be described to the model: {e} (a tool needs type hints and a "
                             "docstring with an Args: section for each parameter)") from None
    return out


@dataclass
class ToolCall:
    name: str
    arguments: dict


def parse_call(text: str) -> ToolCall | str:
    """The call in the last ``<tool_call>...</tool_call>`` of ``text``, or why there is none."""
    end = text.rfind(CALL_CLOSE)
    start = text.rfind(CALL_OPEN, 0, end if end >= 0 else len(text))
    if start < 0 or end < 0:
        return f"no {CALL_OPEN} ... {CALL_CLOSE} block"
    body = text[start + len(CALL_OPEN):end].strip()
    try:
        obj = json.loads(body)
    except ValueError as e:
        return f"the tool call is not JSON ({e})"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return 'the tool call must be {"name": ..., "arguments": {...}}'
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            pass
    if not isinstance(args, dict):
        return 'the tool call\'s "arguments" must be an object'
    return ToolCall(obj["name"], args)


@dataclass
class ToolResult:
    text: str
    error: bool  # the call failed (unparseable, unknown tool, raised, timed out, died): an error turn
    seconds: float


class ToolPool:
    """Spawned workers that run tool calls, ``timeout_s`` of wall clock each, results cut to
    ``max_output_chars``. Thread-safe and concurrent: calls from any threads share the workers,
    each call holding one worker while it runs. Workers start with the pool and import every
    tool first (``start_timeout_s``); a worker killed for overrunning is replaced, and its
    start-up never counts against a call's time."""

    start_timeout_s = 300.0

    def __init__(self, tools: list[str], num_workers: int = 2, timeout_s: float = 10.0, max_output_chars: int = 1000):
        self.paths = {}
        for spec in tools:
            fn = load(spec)  # refused here, in the caller, before any worker starts
            self.paths[getattr(fn, "__name__", spec)] = BUILT_IN.get(spec, spec)
        self.timeout_s, self.max_output_chars = float(timeout_s), int(max_output_chars)
        self._ctx = multiprocessing.get_context("spawn")
        n = max(1, int(num_workers))
        self._workers: list[_Worker | None] = [_Worker(self._ctx, list(self.paths.values())) for _ in range(n)]
        self._free = list(range(n))  # worker slots no call holds
        self._cond = threading.Condition()
        self._closed = False
        self._threads = ThreadPoolExecutor(n, thread_name_prefix="tool-call")  # run()'s calls, in parallel

    def run(self, calls: list[ToolCall | str]) -> list[ToolResult]:
        """One result per call, in order (a str is a call that did not parse: an error result),
        the calls running in parallel on the free workers."""
        results: list[ToolResult | None] = [None] * len(calls)
        todo = []
        for i, c in enumerate(calls):
            if isinstance(c, str):
                results[i] = ToolResult(f"error: {c}", True, 0.0)
            elif c.name not in self.paths:
                results[i] = ToolResult(f"error: unknown tool {c.name!r}; available: {', '.join(self.paths)}", True, 0.0)
            else:
                todo.append(i)
        for i, res in zip(todo, self._threads.map(lambda i: self._call(calls[i]), todo)):
            results[i] = res
        return results

    def _call(self, call: ToolCall) -> ToolResult:
        with self._cond:
            while not self._free and not self._closed:
                self._cond.wait()
            if self._closed:
                raise RuntimeError("ToolPool is closed")
            slot = self._free.pop()
        try:
            if self._workers[slot] is None or not self._workers[slot].proc.is_alive():
                self._workers[slot] = _Worker(self._ctx, list(self.paths.values()))
            worker = self._workers[slot]
            worker.wait_ready(self.start_timeout_s)
            worker.conn.send((self.paths[call.name], call.arguments, self.max_output_chars))
            t0 = time.monotonic()
            if worker.conn.poll(self.timeout_s):  # an answer, or the end of a worker that died
                try:
                    text, error = worker.conn.recv()
                except (EOFError, OSError):
                    text, error = f"error: the tool's process died ({worker.exit_status()})", True
                    self._kill(slot)
            else:
                self._kill(slot)
                text, error = f"error: the tool did not answer within {self.timeout_s:g} s", True
            return ToolResult(text, error, time.monotonic() - t0)
        finally:
            with self._cond:
                self._free.append(slot)
                self._cond.notify()

    def _kill(self, slot: int) -> None:
        if self._workers[slot] is not None:
            self._workers[slot].kill()
            self._workers[slot] = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._threads.shutdown(wait=False, cancel_futures=True)
        for slot in range(len(self._workers)):
            self._kill(slot)


class _Worker:
    def __init__(self, ctx, paths: list[str]):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, paths), daemon=True, name="r1ray-tool-worker")
        self.proc.start()
        child.close()
        self.ready = False

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the worker has imported every tool (it says so once)."""
        if self.ready:
            return
        if not self.conn.poll(timeout_s):
            raise RuntimeError(f"a tool worker did not start within {timeout_s:g} s")
        try:
            self.conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"a tool worker died while starting ({self.exit_status()})") from None
        self.ready = True

    def exit_status(self) -> str:
        self.proc.join(1)
        return f"exit status {self.proc.exitcode}"

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.join(5)
        with contextlib.suppress(Exception):
            self.conn.close()


class _Capped(io.StringIO):
    """stdout of a tool: kept up to a size, the rest counted and dropped."""

    def __init__(self, cap: int):
        super().__init__()
        self.cap, self.dropped = cap, 0

    def write(self, s: str) -> int:
        room = self.cap - self.tell()
        if room > 0:
            super().write(s[:room])
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)


def clip(text: str, cap: int) -> str:
    return text if len(text) <= cap else f"{text[:cap]}\n... ({len(text) - cap} more characters cut)"


def _worker_main(conn, paths: list[str]) -> None:
    fns: dict[str, object] = {path: load(path) for path in paths}  # imports before the first call's clock
    conn.send("ready")
    while True:
        try:
            path, arguments, cap = conn.recv()
        except (EOFError, OSError):
            return
        out = _Capped(cap)
        try:
            fn = fns[path]  # the pool sends only the paths this worker loaded at start
            with contextlib.redirect_stdout(out):
                value = fn(**arguments)
            if value is None:  # what it printed, cut where the buffer stopped keeping it
                text = out.getvalue() + (f"\n... ({out.dropped} more characters cut)" if out.dropped else "")
                reply = (text, False)
            else:
                reply = (clip(str(value), cap), False)
        except BaseException as e:  # the policy sees the error; the worker lives on
            reply = (clip(f"error: {type(e).__name__}: {e}", cap), True)
        conn.send(reply)
