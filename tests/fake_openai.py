"""A small OpenAI-compatible chat-completions server for the distillation tests: it answers from
a table, checks the API key, and injects faults on chosen prompts (429, 500, a hang past the
client's timeout, a body that is not JSON), logging every request it gets."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    """``answer(prompt, i)`` gives the i-th completion's text for a prompt. ``faults[prompt]`` is a
    list of faults served one per request before answering ("429", "500", "hang",
    "malformed"), or the string "always-500"; ``fault_fn(prompt)`` may name a fault for any
    prompt without a plan. ``delay_s`` slows every answer; ``retry_after`` is the Retry-After
    header of a 429. ``times`` holds each chat request's arrival (time.monotonic()) and
    ``max_in_flight`` the most requests it held at once."""

    def __init__(self, answer, key: str | None = None, faults: dict | None = None, delay_s: float = 0.0,
                 hang_s: float = 5.0, split_reasoning: bool = False, fault_fn=None, retry_after: str = "0"):
        self.answer, self.key, self.faults = answer, key, dict(faults or {})
        self.fault_fn, self.retry_after = fault_fn, retry_after
        self.times: list[float] = []
        self.in_flight = self.max_in_flight = 0
        self.split_reasoning = split_reasoning  # the think block as reasoning_content (DeepSeek's API)
        self.delay_s, self.hang_s = delay_s, hang_s
        self.log: list[tuple[str, str]] = []  # (prompt, what happened)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json", headers: dict | None = None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _authorized(self) -> bool:
                if fake.key is None:
                    return True
                if self.headers.get("Authorization") == f"Bearer {fake.key}":
                    return True
                self._send(401, json.dumps({"error": {"message": "invalid api key"}}).encode())
                return False

            def do_GET(self):
                if not self._authorized():
                    return
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, json.dumps({"object": "list", "data": [{"id": "teacher", "object": "model"}]}).encode())
                else:
                    self._send(404, b"{}")

            def do_POST(self):
                with fake.lock:
                    fake.times.append(time.monotonic())
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    self._post()
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _post(self):
                length = int(self.headers.get("Content-Length") or 0)
                req = json.loads(self.rfile.read(length) or b"{}")
                if not self._authorized():
                    return
                prompt = req["messages"][-1]["content"]
                with fake.lock:
                    plan = fake.faults.get(prompt)
                    fault = None
                    if plan == "always-500":
                        fault = "500"
                    elif plan:
                        fault = plan.pop(0)
                    elif fake.fault_fn is not None:
                        fault = fake.fault_fn(prompt)
                    fake.log.append((prompt, fault or "ok"))
                if fault == "429":
                    return self._send(429, json.dumps({"error": {"message": "rate limited"}}).encode(),
                                      headers={"Retry-After": fake.retry_after})
                if fault == "echo-500":  # a proxy that quotes the request's headers back
                    return self._send(500, json.dumps({"error": {"message": f"bad gateway for {dict(self.headers)}"}}).encode())
                if fault == "500":
                    return self._send(500, json.dumps({"error": {"message": "upstream exploded"}}).encode())
                if fault == "hang":
                    time.sleep(fake.hang_s)
                    return self._send(504, b"{}")
                if fault == "malformed":
                    return self._send(200, b'{"id": "x", "choices": [{"index": 0, "message": {"role": "assis')
                if fake.delay_s:
                    time.sleep(fake.delay_s)
                n = int(req.get("n") or 1)
                texts = [fake.answer(prompt, i) for i in range(n)]
                body = {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                        "model": req.get("model"),
                        "choices": [{"index": i, "message": fake.message(t), "finish_reason": "stop"}
                                    for i, t in enumerate(texts)],
                        "usage": {"prompt_tokens": 5, "completion_tokens": sum(len(t.split()) for t in texts),
                                  "total_tokens": 5 + sum(len(t.split()) for t in texts)}}
                self._send(200, json.dumps(body).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def message(self, text: str) -> dict:
        if self.split_reasoning and "</think>" in text:
            think, answer = text.split("</think>", 1)
            return {"role": "assistant", "content": answer.strip(), "reasoning_content": think.replace("<think>", "")}
        return {"role": "assistant", "content": text}

    def requests_for(self, prompt: str) -> list[str]:
        with self.lock:
            return [what for p, what in self.log if p == prompt]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
