"""A client that drops a stream stops its generation and frees its slot."""
import time

import pytest
import requests

from fastchat_bigdl.bench.random_model import QUICK_SHAPE, build_random_llama, words
from fastchat_bigdl.stack.serve import Stack, free_port

pytestmark = [pytest.mark.slow]


def test_dropped_streams_do_not_delay_the_next_request(tmp_path):
    model = build_random_llama(tmp_path / "long-answers", QUICK_SHAPE)  # 1024-token context
    stack = Stack(model_path=str(model), model_name="long-answers", log_dir=tmp_path / "logs", port=free_port(),
                  worker_args=["--limit-worker-concurrency", "3"])
    stack.start()
    try:
        stack.wait_ready(240, progress=lambda line: None)
        body = {"model": "long-answers", "messages": [{"role": "user", "content": words(16, 1, QUICK_SHAPE.vocab)}],
                "max_tokens": 900, "temperature": 0}
        # baseline: how long a short request takes on an idle worker
        started = time.monotonic()
        assert requests.post(stack.base_url + "/chat/completions", json=dict(body, max_tokens=4), timeout=60).ok
        idle = time.monotonic() - started
        started = time.monotonic()
        full = requests.post(stack.base_url + "/chat/completions", json=body, timeout=300).json()
        long_answer = time.monotonic() - started
        assert full["usage"]["completion_tokens"] > 500  # an abandoned stream would run this long
        for _ in range(3):  # as many as the worker runs at once: all its slots
            r = requests.post(stack.base_url + "/chat/completions", json=dict(body, stream=True), stream=True,
                              timeout=60)
            next(line for line in r.iter_lines() if line.startswith(b"data: "))  # it is generating
            r.close()  # the client goes away mid-stream
        started = time.monotonic()
        r = requests.post(stack.base_url + "/chat/completions", json=dict(body, max_tokens=4), timeout=300)
        waited = time.monotonic() - started
        assert r.status_code == 200
        # had the abandoned generations kept their slots, this would wait for ~3 long answers
        assert waited < max(5 * idle, 2.0) and waited < long_answer / 2, (waited, idle, long_answer)
    finally:
        stack.stop()
