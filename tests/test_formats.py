"""Low-bit formats per device: every format offered for CPU serves a request for real,
and one that cannot run is refused at start-up with the formats that can."""
import subprocess
import sys

import pytest
import requests

from fastchat_bigdl.lowbit.backend import resolve_backend
from fastchat_bigdl.lowbit.formats import CPU_FORMATS, NOT_LOADABLE, check_format, formats_for, UnsupportedFormat
from fastchat_bigdl.stack.serve import free_port
from helpers import wait_for

BACKEND = resolve_backend()


def test_cpu_list_is_what_the_library_has_of_the_runnable_ones():
    cpu = formats_for(BACKEND, "cpu")
    assert "sym_int4" in cpu and set(cpu) <= set(CPU_FORMATS) and set(cpu) <= set(BACKEND.qtypes)
    assert not set(NOT_LOADABLE) & set(formats_for(BACKEND, "xpu"))


@pytest.mark.parametrize("low_bit", ["nf4", "fp8", "fp16", "no_such_format"])
def test_formats_that_cannot_run_on_cpu_are_refused_naming_those_that_can(low_bit):
    with pytest.raises(UnsupportedFormat) as refused:
        check_format(BACKEND, "cpu", low_bit)
    message = str(refused.value)
    assert f"--low-bit {low_bit} does not run on cpu" in message and "sym_int4" in message


@pytest.mark.slow
@pytest.mark.backend
@pytest.mark.parametrize("low_bit", formats_for(BACKEND, "cpu"))
def test_every_cpu_format_serves_a_request(tiny_llama, tmp_path, low_bit):
    """A real worker process per format (a format whose kernel aborts would take the
    process down, not the test run): loaded, then one generation over HTTP."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastchat_bigdl.model_worker", "--bigdl_load", "--device", "cpu",
         "--low-bit", low_bit, "--model-path", str(tiny_llama), "--no-register", "--no-low-bit-cache",
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def listening():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                return requests.post(base + "/worker_get_status", timeout=2).ok
            except requests.ConnectionError:
                return False

        wait_for(listening, 120, f"the {low_bit} worker to listen")
        r = requests.post(base + "/worker_generate", timeout=60,
                          json={"prompt": "hello world how are", "max_new_tokens": 4, "temperature": 0,
                                "stop_token_ids": []})
        body = r.json()
        assert r.status_code == 200 and body["error_code"] == 0, body
        assert body["usage"]["completion_tokens"] >= 1
        assert proc.poll() is None  # still serving after the request
    finally:
        proc.terminate()
        proc.wait(30)
