"""``fastchat-bigdl doctor``: one line per check, ✓ or ✗ with a fix, for the problems users
could not see (proxy on localhost, worker not registered, short timeouts, no Intel GPU,
unsupported versions). Exit code 1 when something blocks serving."""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

from fastchat_bigdl.common.netenv import proxy_settings_before_bypass
from fastchat_bigdl.lowbit.backend import BackendError, installed_version, resolve_backend

# (low-bit library, version) -> the transformers releases it is tested with here: the
# default stack first (docs/versions.md says which serves what)
SUPPORTED = {("ipex-llm", "2.2.0"): ("4.53.3", "4.37.0"), ("bigdl-llm", "2.4.0"): ("4.31.0",)}
FSCHAT_RANGE = ("0.2.36", "0.3")
DEFAULT_PORTS = {8000: "OpenAI API server", 21001: "FastChat controller", 21002: "FastChat worker"}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    blocking: bool = False


def versions() -> List[Check]:
    from packaging.version import Version

    import torch
    import transformers

    checks = [Check("python", True, platform.python_version()),
              Check("torch", True, torch.__version__),
              Check("transformers", True, transformers.__version__)]
    fschat = installed_version("fschat")
    in_range = fschat is not None and Version(FSCHAT_RANGE[0]) <= Version(fschat) < Version(FSCHAT_RANGE[1])
    checks.append(Check("fschat", in_range, fschat or "not installed",
                        f"pip install 'fschat[model_worker]>={FSCHAT_RANGE[0]},<{FSCHAT_RANGE[1]}'", blocking=True))
    try:
        backend = resolve_backend()
    except BackendError as exc:
        checks.append(Check("low-bit library", False, "none usable", str(exc), blocking=True))
        return checks
    checks.append(Check("low-bit library", True, f"{backend} (active)"))
    tested = SUPPORTED.get((backend.distribution, backend.version), ())
    ok = transformers.__version__ in tested
    checks.append(Check(
        "supported combination", ok,
        f"{backend} with transformers {transformers.__version__}"
        + (" (tested)" if ok else f" (tested: transformers {' or '.join(tested) or 'none'})"),
        "reinstall one of the tested stacks: pip install 'fastchat-bigdl[cpu]' or 'fastchat-bigdl[bigdl]'",
        blocking=bool(tested) and all(Version(transformers.__version__).major != Version(t).major for t in tested),
    ))
    ipex = installed_version("intel-extension-for-pytorch")
    checks.append(Check("intel-extension-for-pytorch", True, ipex or "not installed (needed for --device xpu only)"))
    guidance = installed_version("llguidance")
    checks.append(Check("llguidance", guidance is not None,
                        f"{guidance} (tool calling, JSON replies)" if guidance else
                        "not installed: tool calls and JSON replies cannot be constrained",
                        "pip install 'llguidance>=1.9,<2'"))
    llama_cpp = installed_version("llama_cpp_python")
    checks.append(Check("llama-cpp-python", True, llama_cpp or "not installed (only for bench --against llama-cpp)"))
    try:
        from autogen_local.flavor import AutoGenNotInstalled, detect_flavor

        flavor = detect_flavor()
    except AutoGenNotInstalled:
        flavor = "not installed"
    checks.append(Check("AutoGen", True, flavor))
    return checks


def devices() -> List[Check]:
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        pass
    isa = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX-512 VNNI", "avx512_vnni"),
                                   ("AMX", "amx_tile")) if flag in flags]
    checks = [Check("CPU", True, f"{os.cpu_count()} logical CPUs; " + (", ".join(isa) or "no AVX2"))]
    import torch

    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        props = xpu.get_device_properties(0)
        checks.append(Check("Intel GPU", True, f"{props.name}, {props.total_memory / 2**30:.1f} GiB"))
    else:
        checks.append(Check("Intel GPU", True, "none visible to torch.xpu (serve with --device cpu)"))
    oneapi = os.environ.get("ONEAPI_ROOT") or ("/opt/intel/oneapi" if os.path.isdir("/opt/intel/oneapi") else None)
    checks.append(Check("oneAPI runtime", True, oneapi or "not found (needed for --device xpu only)"))
    return checks


def proxy(original_env: Dict[str, Optional[str]]) -> List[Check]:
    """Whether a request to the local server would go through a proxy, judged on the
    environment as the user set it (this process bypasses loopback itself)."""
    import urllib.request

    env = {k: v for k, v in original_env.items() if v is not None}
    shown = ", ".join(f"{k}={v}" for k, v in env.items()) or "no proxy variables set"
    # Like requests/curl: the lower-case variable wins; loopback URLs are plain http.
    http_proxy = env.get("http_proxy") or env.get("HTTP_PROXY")
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
    caught = [host for host in ("127.0.0.1", "localhost")
              if http_proxy and not urllib.request.proxy_bypass_environment(host, {"no": no_proxy})]
    if not caught:
        return [Check("proxy", True, f"loopback is not proxied ({shown})")]
    return [Check("proxy", False,
                  f"requests to {', '.join(caught)} would go through the proxy ({shown})",
                  "fastchat-bigdl and autogen_local bypass it themselves; for other clients and curl: "
                  "export no_proxy=localhost,127.0.0.1,::1 NO_PROXY=localhost,127.0.0.1,::1")]


def stack(base_url: str, api_key: Optional[str]) -> List[Check]:
    import requests
    from autogen_local.endpoint import DEFAULT_TIMEOUT

    headers = {"Authorization": f"Bearer {api_key or os.environ.get('OPENAI_API_KEY') or 'EMPTY'}"}
    try:
        r = requests.get(base_url + "/models", headers=headers, timeout=10)
    except requests.RequestException as exc:
        return [Check("server", False, f"no answer at {base_url} ({type(exc).__name__})",
                      "start one with `fastchat-bigdl serve`, or pass --base-url", blocking=True)]
    if r.status_code == 401:
        return [Check("server", False, f"{base_url} requires an API key", "pass --api-key or set OPENAI_API_KEY",
                      blocking=True)]
    try:
        models = [m["id"] for m in r.json().get("data", [])] if r.ok else None
    except ValueError:
        models = None
    if models is None:
        return [Check("server", False, f"{base_url}/models answered {r.status_code}: {r.text[:120]}",
                      "is the controller running? see the API server's log", blocking=True)]
    checks = [Check("server", True, f"{base_url} answers; controller reachable")]
    if not models:
        checks.append(Check("workers", False, "no worker has registered a model yet",
                            "wait for the worker to finish loading (chats started now get error 40301)",
                            blocking=True))
        return checks
    checks.append(Check("workers", True, f"serving {', '.join(models)}"))
    started = time.perf_counter()
    r = requests.post(base_url + "/chat/completions", headers=headers, timeout=DEFAULT_TIMEOUT, json={
        "model": models[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    latency = time.perf_counter() - started
    checks.append(Check("1-token completion", r.ok, f"{latency * 1000:.0f} ms" if r.ok else f"{r.status_code} {r.text[:120]}",
                        "see the worker's log", blocking=not r.ok))
    return checks


def timeouts() -> List[Check]:
    from autogen_local.endpoint import DEFAULT_TIMEOUT

    value = os.environ.get("FASTCHAT_WORKER_API_TIMEOUT")
    worker_api = int(value) if value else None
    where = (f"{worker_api} s here" if value else
             f"unset here: `serve` uses {DEFAULT_TIMEOUT:.0f} s, a hand-started API server FastChat's 100 s")
    return [Check("timeouts", worker_api is None or worker_api >= DEFAULT_TIMEOUT,
                  f"FastChat's worker API timeout {where}; clients via autogen_local {DEFAULT_TIMEOUT:.0f} s",
                  f"start the API server with FASTCHAT_WORKER_API_TIMEOUT={DEFAULT_TIMEOUT:.0f} "
                  "(`fastchat-bigdl serve` does), or it gives up on long answers before the client")]


def ports() -> List[Check]:
    busy = []
    for port, what in DEFAULT_PORTS.items():
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                busy.append(f"{port} ({what})")
    return [Check("default ports", True, ("in use: " + ", ".join(busy)) if busy else "8000, 21001, 21002 free")]


def run_checks(base_url: Optional[str], api_key: Optional[str]) -> List[Check]:
    from autogen_local.endpoint import resolve_base_url

    base_url = resolve_base_url(base_url)  # importing autogen_local bypasses this process's proxies
    return (versions() + devices() + proxy(proxy_settings_before_bypass()) + timeouts()
            + stack(base_url, api_key) + ports())


def render(checks: List[Check]) -> str:
    lines = []
    for c in checks:
        mark = "✓" if c.ok else "✗"
        lines.append(f"{mark} {c.name}: {c.detail}" + (f"\n    fix: {c.fix}" if not c.ok and c.fix else ""))
    return "\n".join(lines)


def add_doctor_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=None, help="The API to check (default $FASTCHAT_BIGDL_BASE_URL "
                        "or http://127.0.0.1:8000/v1)")
    parser.add_argument("--api-key", default=None, help="Key for an API server started with --api-keys")
    parser.add_argument("--json", action="store_true", help="Machine-readable output, for bug reports")


def main_args(args: argparse.Namespace) -> int:
    checks = run_checks(args.base_url, args.api_key)
    blocked = any(c.blocking and not c.ok for c in checks)
    if args.json:
        print(json.dumps({"ok": not blocked, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print(render(checks))
        print("\nsomething blocks serving: see the ✗ lines" if blocked else "\nnothing blocks serving")
    sys.stdout.flush()
    return 1 if blocked else 0
