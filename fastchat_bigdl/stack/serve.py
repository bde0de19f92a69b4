"""``fastchat-bigdl serve``: FastChat's controller, the low-bit worker and FastChat's
OpenAI API server as child processes on loopback, supervised as one stack."""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import requests

from fastchat_bigdl.api import API_KEYS_ENV, DEFAULT_MAX_TOKENS, DEFAULT_MAX_TOKENS_ENV
from fastchat_bigdl.common.netenv import bypass_proxy_for_loopback

# The API server must not give up on a slow local decode before the client does.
WORKER_API_TIMEOUT = 600
STOP_GRACE_SECONDS = 10
AUTO_LOW_BIT = "auto"  # no --low-bit for the worker: sym_int4, or what a .gguf file's quantization suggests
PROGRESS_MARKERS = ("fastchat_bigdl", "Converting", "Traceback", "Error", "error:")
PORT_RETRIES = 3  # restarts of a worker whose port another process took before it bound


class StackError(RuntimeError):
    """The stack could not start or a child died; the message has the details."""


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_keys: Optional[str]) -> Optional[str]:
    if is_loopback(host) or api_keys:
        return None
    return (f"the API server listens on {host} without API keys: anyone who can reach this port "
            "can use the model. Pass --api-keys.")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ensure_port_free(host: str, port: int, flag: str = "--port") -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise StackError(f"{host}:{port} is already in use ({exc.strerror}); pass another {flag}") from None


def _die_with_parent() -> None:
    """Child-side: get SIGTERM if serve itself dies (even by SIGKILL), so no orphan
    is left holding the model in memory."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Child:
    name: str
    argv: List[str]
    log_path: Path
    proc: Optional[subprocess.Popen] = None
    _log_offset: int = 0

    def start(self, env: dict) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches serve, which stops us in order
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except OSError:
            return ""

    def new_log_lines(self) -> List[str]:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                f.seek(self._log_offset)
                text = f.read()
                self._log_offset = f.tell()
        except OSError:
            return []
        return text.splitlines()

    def stop(self) -> None:
        if not self.alive():
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# For the stock baseline (low_bit=None) too: FastChat's own API server module cannot
# stream on pydantic 2 (see api.pydantic_compat); this is the same server, adapted.
API_MODULE = "fastchat_bigdl.openai_api_server"
WEB_MODULE = "fastchat_bigdl.web"  # FastChat's gradio chat page (serve --web)
WEB_PORT = 7860  # gradio's usual port


@dataclass
class Stack:
    model_path: str
    model_name: str
    log_dir: Path
    device: str = "cpu"
    low_bit: Optional[str] = "sym_int4"  # AUTO_LOW_BIT: the worker's choice; None: FastChat's stock worker
    host: str = "127.0.0.1"
    port: int = 8000
    worker_args: List[str] = field(default_factory=list)
    api_keys: Optional[str] = None  # comma-separated, FastChat's --api-keys
    workers: int = 1
    default_max_tokens: int = DEFAULT_MAX_TOKENS  # for chat requests without max_tokens; 0: none
    python: str = sys.executable
    web_port: Optional[int] = None  # FastChat's chat page on 127.0.0.1:web_port (serve --web)
    worker_prefix: List[str] = field(default_factory=list)  # a command the worker runs under (bench's cgroup)
    children: List[Child] = field(default_factory=list)
    controller_url: str = ""
    _reported: set = field(default_factory=set)
    _port_retries: int = 0

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def web_url(self) -> Optional[str]:
        return f"http://127.0.0.1:{self.web_port}" if self.web_port else None

    def env(self) -> dict:
        env = dict(os.environ)
        bypass_proxy_for_loopback(env)
        env.setdefault("FASTCHAT_WORKER_API_TIMEOUT", str(WORKER_API_TIMEOUT))
        env["LOGDIR"] = str(self.log_dir)
        env["PYTHONUNBUFFERED"] = "1"
        # A process that used a fast tokenizer and then forks would warn in every log.
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env[DEFAULT_MAX_TOKENS_ENV] = str(self.default_max_tokens)
        if self.api_keys:  # by environment: FastChat logs its argv, keys must not land in logs
            env[API_KEYS_ENV] = self.api_keys
        return env

    def worker_argv(self, port: int, controller: str) -> List[str]:
        """This package's low-bit worker; ``low_bit=None`` gives FastChat's stock worker
        (full precision) on the same model, as the benchmark's baseline."""
        if self.low_bit is None:
            module, low_bit_args = "fastchat.serve.model_worker", []
        else:
            module, low_bit_args = "fastchat_bigdl.model_worker", ["--bigdl_load"]
            if self.low_bit != AUTO_LOW_BIT:
                low_bit_args += ["--low-bit", self.low_bit]
        return [*self.worker_prefix, self.python, "-m", module, *low_bit_args, "--model-path", self.model_path,
                "--model-names", self.model_name, "--device", self.device, "--host", "127.0.0.1",
                "--port", str(port), "--worker-address", f"http://127.0.0.1:{port}",
                "--controller-address", controller, *self.worker_args]

    def plan(self) -> List[Child]:
        controller_port = free_port()
        self.controller_url = f"http://127.0.0.1:{controller_port}"
        py = [self.python, "-m"]
        workers = []
        for i in range(1, self.workers + 1):
            name = "worker" if i == 1 else f"worker-{i}"
            workers.append(Child(name, self.worker_argv(free_port(), self.controller_url),
                                 self.log_dir / f"{name}.out"))
        children = [
            Child("controller", py + ["fastchat.serve.controller", "--host", "127.0.0.1",
                                      "--port", str(controller_port)], self.log_dir / "controller.out"),
            *workers,
            Child("api", py + [API_MODULE, "--host", self.host, "--port", str(self.port),
                               "--controller-address", self.controller_url], self.log_dir / "api.out"),
        ]
        if self.web_port:  # loopback only: the page has no API keys to check
            children.append(Child("web", py + [WEB_MODULE, "--host", "127.0.0.1", "--port", str(self.web_port),
                                               "--controller-url", self.controller_url], self.log_dir / "web.out"))
        return children

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    @property
    def worker_children(self) -> List[Child]:
        return [c for c in self.children if c.name.startswith("worker")]

    def registered_workers(self) -> int:
        """How many registered workers answer the controller (each reports speed 1)."""
        try:
            r = requests.post(self.controller_url + "/worker_get_status", timeout=5)
            return int(r.json().get("speed", 0)) if r.ok else 0
        except (requests.RequestException, ValueError):
            return 0

    def start(self) -> None:
        ensure_port_free(self.host, self.port)
        if self.web_port:
            ensure_port_free("127.0.0.1", self.web_port, "--web-port")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children = self.plan()
        env = self.env()
        for child in self.children:
            child.start(env)

    def check_children(self, report: Optional[Callable[[str], None]] = None) -> None:
        """Raise StackError when the stack can no longer serve: the controller or the API
        server died, or every worker did. With several workers, a dead one is reported
        (once, through ``report``) and the survivors keep serving."""
        live_workers = [c for c in self.worker_children if c.alive()]
        for child in self.children:
            if child.alive() or self._restarted_on_another_port(child):
                continue
            code = child.proc.returncode if child.proc else None
            message = (f"the {child.name} process exited (code {code}); its last log lines "
                       f"({child.log_path}):\n{child.tail()}")
            if child in self.worker_children and live_workers and report is not None:
                if child.name not in self._reported:
                    self._reported.add(child.name)
                    report(message + f"\n{len(live_workers)} worker(s) keep serving")
                continue
            raise StackError(message)

    def _restarted_on_another_port(self, child: Child) -> bool:
        """A worker binds its port only once its model is loaded, seconds after ``plan``
        found the port free; if another process took it meanwhile, the worker starts
        again on a new port (a few times at most)."""
        if (child not in self.worker_children or self._port_retries >= PORT_RETRIES
                or "address already in use" not in child.tail(5)):
            return False
        self._port_retries += 1
        port = free_port()
        child.argv = self.worker_argv(port, self.controller_url)
        with open(child.log_path, "a", encoding="utf-8") as log:
            log.write(f"fastchat-bigdl serve: its port was taken before it could bind; restarting on {port}\n")
        child.start(self.env())
        return True

    def model_listed(self) -> bool:
        headers = {"Authorization": f"Bearer {self.api_keys.split(',')[0]}"} if self.api_keys else {}
        try:
            r = requests.get(self.base_url + "/models", headers=headers, timeout=5)
            return r.ok and any(m.get("id") == self.model_name for m in r.json().get("data", []))
        except (requests.RequestException, ValueError):
            return False

    def web_page_up(self) -> bool:
        """True without --web; else once the chat page answers."""
        if not self.web_url:
            return True
        try:
            return requests.get(self.web_url, timeout=5).ok
        except requests.RequestException:
            return False

    def wait_ready(self, timeout: float, progress: Callable[[str], None] = print) -> None:
        deadline = time.monotonic() + timeout
        worker = self.child("worker")
        while time.monotonic() < deadline:
            for line in worker.new_log_lines():
                if any(marker in line for marker in PROGRESS_MARKERS):
                    progress(f"  worker: {line.split(' | ')[-1].strip()}")
            self.check_children()
            if self.model_listed() and self.registered_workers() >= self.workers and self.web_page_up():
                return
            time.sleep(0.5)
        raise StackError(f"{self.model_name} was not listed at {self.base_url}/models within {timeout:.0f} s")

    def watch(self, poll: float = 1.0, report: Callable[[str], None] = print) -> None:
        """Block until the stack cannot serve any more (raises StackError)."""
        while True:
            self.check_children(report)
            time.sleep(poll)

    def stop(self) -> None:
        # API server first (no new requests), controller last.
        for child in reversed(self.children):
            child.stop()


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def low_bit_help() -> str:
    # Static: building the parser must not import the low-bit library (it takes seconds).
    from fastchat_bigdl.lowbit.formats import CPU_FORMATS

    return (f"Low-bit weight format (default sym_int4; for a .gguf file the one closest to its own "
            f"quantization: sym_int4 for Q4_0/Q4_1, sym_int8 for Q4_K/Q5_x/Q6_K/Q8_0). On cpu: "
            f"{', '.join(CPU_FORMATS)} (those the installed library has); on xpu: any the library loads. "
            "Checked before anything starts.")


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None,
                        help="Hugging Face checkpoint dir or Llama-family .gguf file (default: the embedded "
                        "SmolLM2-135M-Instruct demo)")
    parser.add_argument("--model-name", default=None,
                        help="Name served in the API (default: the dir name, or the .gguf file's name without .gguf)")
    parser.add_argument("--device", choices=["cpu", "xpu"], default="cpu")
    parser.add_argument("--low-bit", default=None, metavar="FORMAT", help=low_bit_help())
    parser.add_argument("--host", default="127.0.0.1",
                        help="API server host (default 127.0.0.1; controller and worker always bind 127.0.0.1)")
    parser.add_argument("--api-keys", default=os.environ.get(API_KEYS_ENV),
                        help="Comma-separated API keys the API server requires (FastChat's --api-keys; "
                        "default $FASTCHAT_BIGDL_API_KEYS)")
    parser.add_argument("--port", type=int, default=8000, help="API server port (default 8000)")
    parser.add_argument("--workers", type=int, default=1,
                        help="Low-bit workers to start behind the controller (each loads the model)")
    parser.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N",
                        help=f"Cap for chat requests that send no max_tokens (default {DEFAULT_MAX_TOKENS}; 0 lets "
                        "them run to the end of the context, as FastChat does)")
    parser.add_argument("--web", action="store_true",
                        help="Also start FastChat's chat page (gradio, the `web` extra) on 127.0.0.1")
    parser.add_argument("--web-port", type=int, default=None, metavar="N",
                        help=f"The chat page's port (default {WEB_PORT}; implies --web)")
    parser.add_argument("--log-dir", default=None, help="Where the processes log")
    parser.add_argument("--ready-timeout", type=float, default=900, help="Seconds to wait for the model")


def check_low_bit(device: str, low_bit: str) -> None:
    """Refuse a format the device cannot run before anything starts (the worker would
    convert the model, report ready, then fail every request)."""
    from fastchat_bigdl.lowbit.backend import resolve_backend
    from fastchat_bigdl.lowbit.formats import check_format

    check_format(resolve_backend(), device, low_bit)


def web_page_port(args: argparse.Namespace) -> tuple:
    """(the chat page's port or None, a problem to report or None), checked before anything
    starts: gradio must be installed, and the page cannot be the API's port."""
    if not (args.web or args.web_port):
        return None, None
    port = args.web_port or WEB_PORT
    if importlib.util.find_spec("gradio") is None:
        return None, "--web needs gradio: pip install 'fastchat-bigdl[web]'"
    if port == args.port or not 0 < port < 65536:
        return None, f"--web-port {port} is not usable (the API server has --port {args.port})"
    return port, None


def run(args: argparse.Namespace) -> int:
    from fastchat_bigdl.common.paths import cache_dir
    from fastchat_bigdl.lowbit.backend import BackendError
    from fastchat_bigdl.lowbit.formats import UnsupportedFormat
    from fastchat_bigdl.lowbit.gguf_checkpoint import is_gguf, served_name
    from fastchat_bigdl.stack.demo_model import DemoModelMissing, ensure_demo_model

    if args.default_max_tokens < 0:
        print("fastchat-bigdl serve: error: --default-max-tokens must be 0 (no cap) or more", file=sys.stderr)
        return 2
    try:
        if args.low_bit:
            check_low_bit(args.device, args.low_bit)
    except (BackendError, UnsupportedFormat) as exc:
        print(f"fastchat-bigdl serve: error: {exc}", file=sys.stderr)
        return 2
    web_port, problem = web_page_port(args)
    if problem:
        print(f"fastchat-bigdl serve: error: {problem}", file=sys.stderr)
        return 2
    if args.model_path is None:
        try:
            print("fastchat-bigdl: preparing the demo model (converted once, then cached) ...", flush=True)
            args.model_path = str(ensure_demo_model())
        except DemoModelMissing as exc:
            print(f"fastchat-bigdl serve: error: {exc}", file=sys.stderr)
            return 2
    model_path = args.model_path.rstrip("/")
    default_name = served_name(model_path) if is_gguf(model_path) else os.path.basename(model_path)
    stack = Stack(
        model_path=model_path,
        model_name=args.model_name or default_name,
        log_dir=Path(args.log_dir) if args.log_dir else cache_dir() / "logs" / time.strftime("%Y%m%d-%H%M%S"),
        device=args.device,
        low_bit=args.low_bit or AUTO_LOW_BIT,
        host=args.host,
        port=args.port,
        api_keys=args.api_keys,
        workers=args.workers,
        default_max_tokens=args.default_max_tokens,
        web_port=web_port,
    )
    warning = exposure_warning(args.host, args.api_keys)
    if warning:
        print(f"fastchat-bigdl serve: warning: {warning}", file=sys.stderr, flush=True)
    # Explicit for SIGINT too: a shell starts background jobs with SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_keyboard_interrupt)
    try:
        low_bit = args.low_bit or ("the format its quantization suggests" if is_gguf(model_path) else "sym_int4")
        print(f"fastchat-bigdl: starting controller, worker ({args.device}, {low_bit}) and API server; "
              f"logs in {stack.log_dir}", flush=True)
        stack.start()
        stack.wait_ready(args.ready_timeout, progress=lambda line: print(line, flush=True))
        page = f" chat page {stack.web_url}" if stack.web_url else ""
        print(f"fastchat-bigdl ready: {stack.base_url} model={stack.model_name}{page} (Ctrl-C to stop)", flush=True)
        stack.watch(report=lambda message: print(f"fastchat-bigdl serve: {message}", file=sys.stderr, flush=True))
    except StackError as exc:
        print(f"fastchat-bigdl serve: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("fastchat-bigdl: stopping ...", flush=True)
    finally:
        stack.stop()
    print("fastchat-bigdl: stopped", flush=True)
    return 0
