"""200 concurrent chat requests against the real stack: each gets a full answer or a
clear 4xx (FastChat's overload code past the queue bound), none hangs, no 5xx."""
import collections
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from helpers import chat, running_stack

pytestmark = [pytest.mark.slow]

M = "tinyllm-instruct"
N = 200
DEADLINE = 180  # seconds any single request may take


def one_request(base_url, i):
    stream = i % 2 == 0
    body = {"model": M, "messages": [{"role": "user", "content": "hello world " * (1 + i % 7)}],
            "max_tokens": 4 + (i % 4) * 8, "temperature": 0, "stream": stream}
    started = time.monotonic()
    try:
        r = requests.post(base_url + "/chat/completions", json=body, stream=stream, timeout=DEADLINE)
        if not stream:
            payload = r.json()
            ok = r.status_code == 200 and payload["usage"]["completion_tokens"] > 0
            return r.status_code, (payload.get("code") if not ok else None), time.monotonic() - started
        events = [line[6:] for line in r.iter_lines() if line.startswith(b"data: ")]
        chunks = [json.loads(e) for e in events if e != b"[DONE]"]
        errors = [c.get("error_code") for c in chunks if "error_code" in c]
        complete = events and events[-1] == b"[DONE]"
        return (r.status_code if complete and not errors else 400), (errors[0] if errors else None), \
            time.monotonic() - started
    except requests.RequestException as exc:
        return "no answer", type(exc).__name__, time.monotonic() - started


def test_two_hundred_concurrent_requests(tiny_chatml, tmp_path):
    worker_args = ["--limit-worker-concurrency", "4", "--max-queued-requests", "40"]
    with running_stack(model_path=str(tiny_chatml), model_name=M, log_dir=tmp_path, worker_args=worker_args) as stack:
        pid = stack.child("worker").proc.pid
        with ThreadPoolExecutor(max_workers=N) as pool:
            results = list(pool.map(lambda i: one_request(stack.base_url, i), range(N)))
        counts = collections.Counter((status, code) for status, code, _ in results)
        slowest = max(seconds for _, _, seconds in results)
        print(f"\n{N} concurrent requests: {dict(counts)}; slowest {slowest:.1f} s")
        assert all(status != "no answer" for status, _, _ in results), counts
        assert not [s for s, _, _ in results if isinstance(s, int) and s >= 500], counts
        answered = sum(1 for status, code, _ in results if status == 200 and code is None)
        refused = [code for status, code, _ in results if status == 400]
        assert answered + len(refused) == N
        assert set(refused) <= {42903}, counts  # only the clear overload error
        assert answered >= 40 and slowest < DEADLINE
        # the worker survived and serves normally afterwards
        r = chat(stack.base_url, M)
        assert r.status_code == 200 and stack.child("worker").proc.pid == pid
