"""Two low-bit workers behind one controller and one API server."""
import asyncio
import collections
import re
import signal

import pytest
import autogen_local
from helpers import chat, running_stack

pytestmark = [pytest.mark.slow]

M = "tinyllm-instruct"


def served_by(stack):
    """Requests each worker has generated for, from its log."""
    return {c.name: len(re.findall(r"prompt \d+ tokens:", c.log_path.read_text(errors="replace")))
            for c in stack.worker_children}


def test_requests_spread_over_two_workers_and_survive_losing_one(tiny_chatml, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCHAT_WORKER_HEART_BEAT_INTERVAL", "2")
    monkeypatch.setenv("FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION", "8")
    with running_stack(model_path=str(tiny_chatml), model_name=M, log_dir=tmp_path, workers=2) as stack:
        assert stack.registered_workers() == 2
        for _ in range(20):
            assert chat(stack.base_url, M).status_code == 200
        split = served_by(stack)
        print(f"\nsplit of 20 requests over two workers: {split}")
        assert sum(split.values()) >= 20 and min(split.values()) >= 5  # shortest-queue dispatch alternates

        stack.child("worker-2").proc.send_signal(signal.SIGKILL)
        stack.child("worker-2").proc.wait(30)
        lost = []
        stack.check_children(report=lost.append)  # the stack still serves: reported, not fatal
        assert lost and "worker-2 process exited" in lost[0] and "1 worker(s) keep serving" in lost[0]

        # Right after the kill, long before the controller's heartbeat expiry would drop the
        # dead worker: a plain client loses nothing (the API server has the controller drop
        # it and sends the request to the survivor), streaming or not, and so do agents.
        def answered(stream: bool) -> str:
            r = chat(stack.base_url, M, stream=stream)
            ok = r.status_code == 200 and ('"error"' not in r.text if stream else r.json()["choices"])
            return "ok" if ok else f"{r.status_code}: {r.text[:120]}"

        outcomes = collections.Counter(answered(stream=i % 2 == 1) for i in range(20))
        print(f"right after the kill: {dict(outcomes)}")
        assert outcomes == {"ok": 20}
        assert served_by(stack)["worker"] >= split["worker"] + 20

        from autogen_core.models import UserMessage

        async def agent_turns():
            client = autogen_local.model_client(M, stack.base_url, wait=False, max_tokens=4)
            try:
                return [await client.create([UserMessage(content="hi", source="user")]) for _ in range(5)]
            finally:
                await client.close()

        assert all(r.usage.completion_tokens > 0 for r in asyncio.run(agent_turns()))
