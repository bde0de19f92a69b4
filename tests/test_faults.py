"""Faults: controller and API server restarts, a worker killed mid-generation, a
directory that is not a model. Each gives a clear error and service resumes."""
import json
import signal
import subprocess
import sys
import time

import pytest
import requests

from helpers import chat, running_stack, wait_for

pytestmark = [pytest.mark.slow]

M = "tinyllm-instruct"


def restart(stack, name):
    child = stack.child(name)
    child.proc.send_signal(signal.SIGKILL)
    child.proc.wait(30)
    child.start(stack.env())


def test_controller_and_api_server_restarts_are_survived(tiny_chatml, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCHAT_WORKER_HEART_BEAT_INTERVAL", "2")  # re-register quickly
    with running_stack(model_path=str(tiny_chatml), model_name=M, log_dir=tmp_path) as stack:
        restart(stack, "controller")  # forgets every worker
        started = time.monotonic()
        wait_for(lambda: chat(stack.base_url, M).status_code == 200, 60, "the worker to re-register")
        print(f"\nworker re-registered {time.monotonic() - started:.1f} s after the controller restart")
        restart(stack, "api")
        wait_for(lambda: _ok(stack), 60, "the API server to come back")
        stack.check_children()  # nothing else died


def _ok(stack):
    try:
        return chat(stack.base_url, M).status_code == 200
    except requests.ConnectionError:
        return False


def test_worker_killed_mid_generation_gives_the_client_an_error_not_a_hang(tiny_chatml, tmp_path):
    with running_stack(model_path=str(tiny_chatml), model_name=M, log_dir=tmp_path) as stack:
        body = {"model": M, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 200, "stream": True}
        r = requests.post(stack.base_url + "/chat/completions", json=body, stream=True, timeout=60)
        lines = r.iter_lines()
        next(line for line in lines if line.startswith(b"data: "))
        stack.child("worker").proc.send_signal(signal.SIGKILL)
        started = time.monotonic()
        events = [line[6:] for line in lines if line.startswith(b"data: ")]  # the rest of the stream
        assert time.monotonic() - started < 30
        assert events[-1] == b"[DONE]"  # ended cleanly, not cut off
        error = next(json.loads(e) for e in events if b'"error"' in e)
        assert error["object"] == "error" and "worker stopped" in error["message"] and error["code"] == 50006
        with pytest.raises(Exception, match="the worker process exited"):
            stack.check_children()
        # until the controller drops it, a request gets a clear error in FastChat's schema, not a hang
        after = chat(stack.base_url, M)
        assert after.status_code == 503
        assert after.json()["object"] == "error" and after.json()["code"] == 50006
        assert "Traceback" not in after.text


def test_a_directory_that_is_not_a_model_is_one_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    out = subprocess.run([sys.executable, "-m", "fastchat_bigdl.model_worker", "--bigdl_load", "--device", "cpu",
                          "--model-path", str(tmp_path), "--no-register"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "error:" in out.stderr and "Traceback" not in out.stderr
