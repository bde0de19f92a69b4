"""1000 sequential requests on one worker: no failure, and no memory growth after warm-up."""
import pytest
import requests

from helpers import running_stack

pytestmark = [pytest.mark.slow]

M = "tinyllm-instruct"
WARM_UP, TOTAL = 100, 1000


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_a_thousand_sequential_requests(tiny_chatml, tmp_path):
    with running_stack(model_path=str(tiny_chatml), model_name=M, log_dir=tmp_path) as stack:
        pid = stack.child("worker").proc.pid
        session = requests.Session()
        failures, warm = [], None
        for i in range(TOTAL):
            stream = i % 3 == 0
            body = {"model": M, "max_tokens": 4, "temperature": 0, "stream": stream,
                    "messages": [{"role": "user", "content": f"hello world {i % 20}"}]}
            r = session.post(stack.base_url + "/chat/completions", json=body, timeout=60)
            if r.status_code != 200 or (stream and not r.text.rstrip().endswith("data: [DONE]")):
                failures.append((i, r.status_code, r.text[:200]))
            if i + 1 == WARM_UP:
                warm = rss_mb(pid)
        end = rss_mb(pid)
        print(f"\n{TOTAL} requests, {len(failures)} failed; worker RSS {warm:.0f} MB after warm-up, "
              f"{end:.0f} MB at the end ({100 * (end - warm) / warm:+.1f}%)")
        assert failures == []
        assert end < warm * 1.05
