"""Run one untrusted Python program locally, inside limits.

What is enforced, from strongest to weakest (see `isolation()` for what
this machine actually gave us):

- its own process: a fresh interpreter (`python -I`) in a fresh temporary
  cwd that is removed afterwards, with a minimal environment;
- resource limits set inside that process before the program runs:
  RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_NPROC (fork bombs), RLIMIT_FSIZE
  (stdout/stderr go to files, so output is bounded too), RLIMIT_NOFILE,
  no core files;
- a wall-clock limit: on expiry the whole process group is SIGKILLed;
- when we are root, the program runs as an unused uid (no passwd entry,
  one per process that runs sandboxes), so RLIMIT_NPROC counts only that
  process's sandboxed programs (the kernel ignores it for root), and a
  fork bomb in one VerifierPool worker cannot starve another's programs;
- when `unshare` works (root, or unprivileged user namespaces): a new
  network namespace with no interfaces but a down loopback, so no
  network at all, and a new PID namespace, so every process the program
  started dies with it, even ones that left the process group;
- and, where mount namespaces work too, the files are confined: a private
  mount namespace in which /tmp, /var/tmp and /dev/shm are fresh empty
  tmpfs, every mount is read-only but the program's own directory (bound
  back at its path), and /proc is a new one for its PID namespace only
  (it sees its own processes, not the host's). Nothing it writes outside
  its directory can exist, and its directory is removed afterwards;
- otherwise, network is only refused at the Python level (socket creation
  raises), which a subprocess such as `curl` would bypass, and files only
  by the permissions of the sandbox uid (`isolation().files` says which).

The sandbox process also gets PDEATHSIG=SIGKILL, so a VerifierPool worker
killed mid-run does not leave it behind.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

logger = logging.getLogger("r1ray.rewards")

# Sandbox uids: a free one from this range, picked per process.
_UID_BASE, _UID_COUNT = 64000, 1000

# Runs inside the sandbox process: limits first, then drop root, then the
# network guard, then the program itself as __main__. Dropping root
# re-executes the interpreter, so that Python starts as the sandbox user
# and finds a standard library that user can read (imports are lazy).
_CONFINE = r"""
def confine(work):
    # In a new mount namespace, as its root: private mounts, empty tmpfs over the shared
    # temporary folders, the program's folder bound back at its path, all else read-only.
    import ctypes, os, re
    libc = ctypes.CDLL(None, use_errno=True)
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
    def mount(source, target, fstype, flags, data=None):
        if libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                      data and data.encode()) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "mount " + target + ": " + os.strerror(err))
    keep = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    for folder in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(folder):
            mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
    os.makedirs(work, exist_ok=True)
    mount("/proc/self/fd/%d" % keep, work, None, MS_BIND)
    os.close(keep)
    for line in open("/proc/self/mountinfo").read().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if point == work or point == "/proc" or point.startswith("/proc/"):
            continue
        mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    os.chdir(work)  # the working directory taken before the mounts is the read-only one underneath
"""

_BOOTSTRAP = _CONFINE + r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
if cfg.get("confine"):
    try:
        confine(cfg["confine"])
    except OSError as e:
        sys.stderr.write("r1ray sandbox: cannot confine files: %s\n" % e)
        os._exit(97)
    cfg["confine"] = None
for name, soft, hard in cfg["rlimits"]:
    resource.setrlimit(getattr(resource, name), (soft, hard))
if cfg["uid"] is not None:
    try:
        import ctypes
        prctl = ctypes.CDLL(None).prctl
    except (ImportError, OSError, AttributeError):
        prctl = None
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
    if prctl is not None:
        prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL again: changing uid cleared it
        if os.getppid() == 1:
            os._exit(137)  # the parent died before we re-armed it
    cfg.update(uid=None, rlimits=[])
    os.execv(sys.executable, [sys.executable, "-I", "-X", "utf8", "-c", cfg["bootstrap"], json.dumps(cfg)])
if cfg["block_sockets"]:
    import socket
    class _NoNetworkSocket(socket.socket):
        def __init__(self, *args, fileno=None, **kwargs):
            if fileno is None:
                raise PermissionError(1, "network access is disabled in the r1ray sandbox")
            super().__init__(*args, fileno=fileno, **kwargs)
    socket.socket = _NoNetworkSocket
sys.argv = [cfg["program"]]
import runpy
runpy.run_path(cfg["program"], run_name="__main__")
"""

_NAMESPACE_PREFIXES = (  # the strictest first: files confined too (a mount namespace, its own /proc)
    ("unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"),
    ("unshare", "--map-root-user", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"),
    ("unshare", "--net", "--pid", "--fork", "--kill-child"),
    ("unshare", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"),
)


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0  # wall clock; CPU time is capped just above it
    memory_mb: int = 512  # address space of each process
    max_processes: int = 32  # processes + threads of the sandbox user
    output_mb: int = 16  # largest stdout/stderr file


@dataclass(frozen=True)
class RunResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool


@dataclass(frozen=True)
class Isolation:
    prefix: tuple[str, ...]  # the unshare command line, or ()
    uid: int | None  # the uid the program runs as, None = ours
    python: str = sys.executable  # the interpreter that runs the program

    @property
    def network(self) -> str:
        return "namespace" if self.prefix else "python-sockets-blocked"

    @property
    def files(self) -> str:
        """"mount-namespace": only the program's folder is writable, /tmp is private and empty,
        /proc shows its own processes; "permissions": what the (sandbox) uid may write."""
        return "mount-namespace" if "--mount" in self.prefix else "permissions"


def run_python(code: str, stdin: str = "", limits: Limits | None = None) -> RunResult:
    """Run `code` with `stdin` as its standard input; never raises for the program's faults."""
    limits = limits or Limits()
    return _run(code, stdin, limits, isolation())


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
    """Probe once per process which isolation this machine allows."""
    prefix: tuple[str, ...] = ()
    if shutil.which("unshare"):
        probe_dir = tempfile.mkdtemp(prefix="r1ray-sandbox-probe-")
        try:
            for candidate in _NAMESPACE_PREFIXES:  # a mount namespace must also let us confine files
                code = _CONFINE + "import sys; confine(sys.argv[1])" if "--mount" in candidate else "pass"
                if _command_works([*candidate, sys.executable, "-I", "-c", code, probe_dir]):
                    prefix = candidate
                    break
        finally:
            shutil.rmtree(probe_dir, ignore_errors=True)
    uid, python = None, sys.executable
    mapped_root = "--map-root-user" in prefix  # inside, "root" is us: no uid to drop to
    if os.geteuid() == 0 and not mapped_root:
        # Our interpreter may live where others cannot read (a venv under
        # /root); then a system Python runs the program, without our venv.
        sandbox_uid = _free_uid()
        for candidate in _interpreters() if sandbox_uid is not None else []:
            probe = _run("print('ok')", "", Limits(timeout_s=10), Isolation(prefix, sandbox_uid, candidate))
            if probe.stdout.strip() == "ok":
                uid, python = sandbox_uid, candidate
                break
        else:
            logger.warning("sandbox: no Python runs as an unprivileged uid; programs run as root and "
                           "RLIMIT_NPROC does not bind (the kernel exempts root)")
    result = Isolation(prefix, uid, python)
    if not prefix:
        logger.warning("sandbox: unshare is unavailable; network is only blocked at the Python socket level")
    elif result.files != "mount-namespace":
        logger.warning("sandbox: no mount namespace here; a program may write wherever its uid may")
    logger.info("sandbox isolation: network=%s pid_namespace=%s files=%s uid=%s python=%s",
                result.network, bool(prefix), result.files, uid, python)
    return result


def _free_uid() -> int | None:
    # Starting from our pid spreads concurrent workers over the range.
    import pwd

    for i in range(_UID_COUNT):
        uid = _UID_BASE + (os.getpid() + i) % _UID_COUNT
        try:
            pwd.getpwuid(uid)  # a real account: never run untrusted code as it
        except KeyError:
            return uid
    return None


def _interpreters() -> list[str]:
    found = [sys.executable, shutil.which("python3"), "/usr/bin/python3"]
    unique: dict[str, str] = {}
    for path in found:
        if path and os.path.exists(path):
            unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


def _command_works(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _rlimits(limits: Limits) -> list[tuple[str, int, int]]:
    cpu = math.ceil(limits.timeout_s) + 1  # soft: SIGXCPU; hard, a second later: SIGKILL
    memory = limits.memory_mb * 1024 * 1024
    output = limits.output_mb * 1024 * 1024
    return [
        ("RLIMIT_CPU", cpu, cpu + 1),
        ("RLIMIT_FSIZE", output, output),
        ("RLIMIT_NOFILE", 64, 64),
        ("RLIMIT_CORE", 0, 0),
        ("RLIMIT_NPROC", limits.max_processes, limits.max_processes),
        ("RLIMIT_AS", memory, memory),  # last: the bootstrap itself needs memory to start
    ]


def _env(workdir: str, block_sockets: bool) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        # One thread per numeric library: threads count against RLIMIT_NPROC.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    if block_sockets:
        # Also steer HTTP clients in child processes at a closed port.
        for key in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            env[key] = "http://127.0.0.1:9"
    return env


def _run(code: str, stdin: str, limits: Limits, iso: Isolation) -> RunResult:
    workdir = tempfile.mkdtemp(prefix="r1ray-sandbox-")
    try:
        if iso.uid is not None:
            os.chown(workdir, iso.uid, iso.uid)  # only the sandbox user (and root) may enter
        program = os.path.join(workdir, "main.py")
        with open(program, "w", encoding="utf-8", errors="replace") as f:
            f.write(code)
        paths = {name: os.path.join(workdir, name) for name in ("stdin", "stdout", "stderr")}
        with open(paths["stdin"], "w", encoding="utf-8", errors="replace") as f:
            f.write(stdin)
        config = {"rlimits": _rlimits(limits), "uid": iso.uid, "program": program,
                  "block_sockets": not iso.prefix, "bootstrap": _BOOTSTRAP,
                  "confine": workdir if iso.files == "mount-namespace" else None}
        argv = [*iso.prefix, iso.python, "-I", "-X", "utf8", "-c", _BOOTSTRAP, json.dumps(config)]
        with open(paths["stdin"], "rb") as fin, open(paths["stdout"], "wb") as fout, \
                open(paths["stderr"], "wb") as ferr:
            returncode, timed_out = _spawn_and_wait(argv, fin, fout, ferr, workdir,
                                                    _env(workdir, not iso.prefix), limits.timeout_s)
        cap = limits.output_mb * 1024 * 1024
        return RunResult(returncode, _read(paths["stdout"], cap), _read(paths["stderr"], cap), timed_out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _spawn_and_wait(argv, fin, fout, ferr, cwd, env, timeout_s) -> tuple[int | None, bool]:
    try:
        proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, cwd=cwd, env=env,
                                close_fds=True, start_new_session=True, preexec_fn=_die_with_parent())
    except OSError as e:
        ferr.write(f"cannot start sandbox: {e}".encode())
        return None, False
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        # Always: a program may leave background children behind in its group.
        _kill_group(proc.pid)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.error("sandbox: process %d survived SIGKILL for 5 s", proc.pid)
    return (None if timed_out else proc.returncode), timed_out


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@functools.lru_cache(maxsize=1)
def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent():
    prctl = _libc_prctl()
    if prctl is None:
        return None
    PR_SET_PDEATHSIG = 1

    def set_pdeathsig():  # runs in the child between fork and exec
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    return set_pdeathsig


def _read(path: str, cap: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(cap).decode("utf-8", errors="replace")
    except OSError:
        return ""
