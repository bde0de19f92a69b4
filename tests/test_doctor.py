"""`fastchat-bigdl doctor` against a real stack and against the seed's broken setups."""
import json
import os
import subprocess
import sys

import pytest

from fastchat_bigdl.stack import doctor
from fastchat_bigdl.stack.serve import free_port
from helpers import running_stack

pytestmark = [pytest.mark.slow]


def run_doctor(*args, env_update=None, drop=()):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_update or {})
    return subprocess.run([sys.executable, "-m", "fastchat_bigdl", "doctor", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def line(out, name):
    return next(l for l in out.stdout.splitlines() if l[2:].startswith(name + ":"))


PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY")


def test_healthy_stack_passes_with_versions_devices_and_latency(tiny_chatml, tmp_path):
    with running_stack(model_path=str(tiny_chatml), model_name="tinyllm-instruct", log_dir=tmp_path) as stack:
        out = run_doctor("--base-url", stack.base_url, drop=PROXY_VARS)
        report = json.loads(run_doctor("--base-url", stack.base_url, "--json", drop=PROXY_VARS).stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("python", "torch", "transformers", "fschat", "low-bit library", "supported combination", "CPU",
                 "Intel GPU", "proxy", "server", "workers", "1-token completion", "default ports"):
        assert line(out, name).startswith("✓"), name
    assert "tinyllm-instruct" in line(out, "workers") and " ms" in line(out, "1-token completion")
    assert report["ok"] is True and {c["name"] for c in report["checks"]} >= {"proxy", "workers"}


def test_a_proxy_that_would_catch_localhost_is_diagnosed(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    out = run_doctor("--base-url", f"http://127.0.0.1:{free_port()}/v1",
                     env_update={"http_proxy": dead, "HTTPS_PROXY": dead}, drop=("no_proxy", "NO_PROXY"))
    proxy = line(out, "proxy")
    assert proxy.startswith("✗") and "127.0.0.1" in proxy and dead in proxy
    assert "export no_proxy=localhost,127.0.0.1" in out.stdout
    # with no_proxy set as the fix says, the same check passes
    fixed = run_doctor(env_update={"http_proxy": dead, "no_proxy": "localhost,127.0.0.1,::1"})
    assert line(fixed, "proxy").startswith("✓")


def test_no_stack_or_a_wrong_port_blocks_with_a_fix():
    url = f"http://127.0.0.1:{free_port()}/v1"
    out = run_doctor("--base-url", url)
    assert out.returncode == 1
    assert line(out, "server").startswith("✗") and url in line(out, "server")
    assert "fastchat-bigdl serve" in out.stdout and "something blocks serving" in out.stdout


def test_an_untested_combination_is_flagged(monkeypatch):
    import transformers

    from fastchat_bigdl.lowbit.backend import resolve_backend

    resolve_backend()  # imported (and cached) under the real version
    monkeypatch.setattr(transformers, "__version__", "5.0.0")
    checks = {c.name: c for c in doctor.versions()}
    combo = checks["supported combination"]
    assert not combo.ok and combo.blocking and "tested: transformers 4." in combo.detail


def test_short_worker_api_timeout_is_flagged(monkeypatch):
    monkeypatch.setenv("FASTCHAT_WORKER_API_TIMEOUT", "60")
    (check,) = doctor.timeouts()
    assert not check.ok and "FASTCHAT_WORKER_API_TIMEOUT=600" in check.fix
    monkeypatch.delenv("FASTCHAT_WORKER_API_TIMEOUT")
    assert doctor.timeouts()[0].ok


def test_tool_calling_and_llama_cpp_support_are_reported(monkeypatch):
    from fastchat_bigdl.lowbit import backend

    checks = {c.name: c for c in doctor.versions()}
    assert checks["llguidance"].ok and "tool calling" in checks["llguidance"].detail
    assert "llama-cpp-python" in checks
    real = backend.installed_version
    monkeypatch.setattr(doctor, "installed_version", lambda name: None if name == "llguidance" else real(name))
    missing = {c.name: c for c in doctor.versions()}["llguidance"]
    assert not missing.ok and not missing.blocking and "pip install 'llguidance" in missing.fix
