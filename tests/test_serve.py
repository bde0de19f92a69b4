"""`fastchat-bigdl serve` as a user runs it: one command, a ready line, clean stop."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fastchat_bigdl.stack.serve import free_port
from helpers import chat, pids_alive, wait_for

pytestmark = pytest.mark.slow

READY = "fastchat-bigdl ready: "


def start_serve(model_path, port, log_dir, *extra, ignore_sigint=False, cwd=None):
    # A shell starts background jobs (`serve &`) with SIGINT ignored.
    preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen(
        [sys.executable, "-m", "fastchat_bigdl", "serve", "--model-path", str(model_path),
         "--port", str(port), "--log-dir", str(log_dir), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=preexec, cwd=cwd,
    )


def read_until_ready(proc, timeout=240):
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(READY):
            return line, lines
    raise AssertionError("serve never printed its ready line:\n" + "".join(lines))


def child_pids(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("sig, background", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["ctrl-c", "sigterm", "sigint-to-background-job"])
def test_serve_starts_answers_and_stops_without_orphans(tiny_llama, tmp_path, sig, background):
    port = free_port()
    (tmp_path / "cwd").mkdir()
    proc = start_serve(tiny_llama, port, tmp_path / "logs", ignore_sigint=background, cwd=tmp_path / "cwd")
    try:
        ready, lines = read_until_ready(proc)
        assert f"http://127.0.0.1:{port}/v1" in ready and "model=Llama-2-7b-chat-hf" in ready
        assert any("worker:" in line and "sym_int4" in line for line in lines), "no load progress shown"
        children = child_pids(proc.pid)
        assert len(children) == 3
        r = chat(f"http://127.0.0.1:{port}/v1", "Llama-2-7b-chat-hf")
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
        proc.send_signal(sig)
        assert proc.wait(60) == 0
        assert "stopped" in proc.stdout.read()
        assert pids_alive(children) == []
        # FastChat's per-process log files land in the log dir, none in the working dir.
        logs = {p.name for p in (tmp_path / "logs").iterdir()}
        assert {"controller.log", "openai_api_server.log"} <= logs and any(
            n.startswith("model_worker_") and n.endswith(".log") for n in logs), logs
        assert list((tmp_path / "cwd").iterdir()) == []
        worker_out = (tmp_path / "logs" / "worker.out").read_text()
        assert "TOKENIZERS_PARALLELISM" not in worker_out and " | INFO | stdout | usage" not in worker_out
    finally:
        proc.kill()


def test_a_dying_child_is_reported_and_the_rest_stopped(tiny_llama, tmp_path):
    port = free_port()
    proc = start_serve(tiny_llama, port, tmp_path / "logs")
    try:
        read_until_ready(proc)
        children = child_pids(proc.pid)
        worker = next(p for p in children if "model_worker" in open(f"/proc/{p}/cmdline").read())
        os.kill(worker, signal.SIGKILL)
        assert proc.wait(60) == 1
        out = proc.stdout.read()
        assert "the worker process exited" in out and "last log lines" in out
        wait_for(lambda: pids_alive(children) == [], 30, "the other children to stop")
    finally:
        proc.kill()


def test_a_worker_whose_port_is_taken_before_it_binds_starts_again_on_another(tiny_llama, tmp_path):
    """serve picks the worker's port, the worker binds it only once its model is loaded;
    another process taking it meanwhile costs a restart, not the stack."""
    from fastchat_bigdl.stack.serve import Stack

    stack = Stack(model_path=str(tiny_llama), model_name="tiny", log_dir=tmp_path, port=free_port())
    planned = stack.plan

    with socket.socket() as thief:
        def plan_and_take_the_workers_port():
            children = planned()
            argv = next(c for c in children if c.name == "worker").argv
            thief.bind(("127.0.0.1", int(argv[argv.index("--port") + 1])))
            thief.listen()
            return children

        stack.plan = plan_and_take_the_workers_port
        stack.start()
        try:
            stack.wait_ready(240, progress=lambda line: None)
            assert chat(stack.base_url, "tiny").status_code == 200
            log = (tmp_path / "worker.out").read_text()
            assert "address already in use" in log and "its port was taken before it could bind" in log
        finally:
            stack.stop()


def test_port_in_use_is_a_clear_error(tiny_llama, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = start_serve(tiny_llama, port, tmp_path / "logs")
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in out and "--port" in out


def test_killing_serve_itself_leaves_no_orphans(tiny_llama, tmp_path):
    """Even a SIGKILL of serve leaves no model-holding orphans behind."""
    proc = start_serve(tiny_llama, free_port(), tmp_path / "logs")
    try:
        read_until_ready(proc)
        children = child_pids(proc.pid)
        proc.kill()
        wait_for(lambda: pids_alive(children) == [], 30, "children to exit after serve was killed")
    finally:
        proc.kill()


def test_api_keys_are_enforced_and_kept_out_of_logs_and_argv(tiny_llama, tmp_path):
    import autogen_local

    port, key = free_port(), "sk-local-test-key"
    proc = start_serve(tiny_llama, port, tmp_path / "logs", "--api-keys", key)
    try:
        read_until_ready(proc)
        base = f"http://127.0.0.1:{port}/v1"
        assert requests_get(base + "/models").status_code == 401
        assert requests_get(base + "/models", "sk-wrong").status_code == 401
        assert requests_get(base + "/models", key).status_code == 200
        # autogen_local sends the key it is given (or $OPENAI_API_KEY)
        assert autogen_local.wait_ready(base, "Llama-2-7b-chat-hf", timeout=60, api_key=key)
        with pytest.raises(autogen_local.EndpointNotReady, match="401"):
            autogen_local.wait_ready(base, "Llama-2-7b-chat-hf", timeout=1, api_key="sk-wrong")
        for child in child_pids(proc.pid):
            assert key not in open(f"/proc/{child}/cmdline").read()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").iterdir() if p.is_file())
    assert logs and key not in logs


@pytest.mark.parametrize("host, keys, warns", [
    ("127.0.0.1", None, False), ("localhost", None, False), ("127.0.0.2", None, False), ("::1", None, False),
    ("0.0.0.0", None, True), ("192.0.2.10", None, True), ("0.0.0.0", "sk-1", False),
])
def test_binding_beyond_loopback_without_keys_warns(host, keys, warns):
    # checked without binding: tests only ever listen on loopback
    from fastchat_bigdl.stack.serve import exposure_warning

    warning = exposure_warning(host, keys)
    assert bool(warning) == warns
    if warns:
        assert host in warning and "--api-keys" in warning


def requests_get(url, key=None):
    import requests

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.get(url, headers=headers, timeout=10)
