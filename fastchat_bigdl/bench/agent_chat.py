"""The job users run this package for, timed: an AutoGen two-agent chat (autogen-agentchat's
round-robin team of two assistants, their model client from ``autogen_local.model_client()``)
against the served stack, with the time of each agent turn. At 7B a turn takes tens of
seconds; the point is that nothing times out, runs out of memory or needs a restart,
whatever the words are.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable, List

TASK = "Write a short plan for a picnic, then improve it turn by turn."


def run_agent_chat(base_url: str, turns: int, max_tokens: int, progress: Callable[[str], None]) -> dict:
    """``turns`` agent replies (the critic answers the task, then the agents alternate) of at
    most ``max_tokens`` each; returns each turn's seconds and reply length, or the error."""
    try:
        from autogen_agentchat import __version__ as version
    except ImportError:
        return {"error": "autogen-agentchat is not installed: pip install \"fastchat-bigdl[autogen]\""}
    progress(f"  AutoGen two-agent chat (autogen-agentchat {version}), {turns} turns ...")
    started = time.perf_counter()
    sent: List[tuple] = [(started, "user", TASK)]
    try:
        asyncio.run(_chat(base_url, turns, max_tokens, sent))
    except Exception as exc:  # the failure is the result: it goes into the report
        return {"error": f"{type(exc).__name__}: {exc}", "turns": _turns(started, sent)[1:]}
    replies = _turns(started, sent)[1:]  # the first message is the task, not a model turn
    for t in replies:
        progress(f"    turn {t['turn']} ({t['agent']}): {t['seconds']:.1f} s, {t['chars']} chars")
    return {"turns": replies, "total_s": sum(t["seconds"] for t in replies), "error": None}


async def _chat(base_url: str, turns: int, max_tokens: int, sent: List[tuple]) -> None:
    """The team's run, each agent message stamped as it arrives."""
    from autogen_agentchat.agents import AssistantAgent
    from autogen_agentchat.messages import TextMessage
    from autogen_agentchat.teams import RoundRobinGroupChat

    from autogen_local import model_client

    client = model_client(base_url=base_url, max_tokens=max_tokens, wait=60)
    critic = AssistantAgent("critic", model_client=client, system_message="You point out one thing to improve.")
    writer = AssistantAgent("writer", model_client=client, system_message="You write short plans.")
    team = RoundRobinGroupChat([critic, writer], max_turns=turns)
    try:
        async for message in team.run_stream(task=TASK):
            if isinstance(message, TextMessage) and message.source != "user":
                sent.append((time.perf_counter(), message.source, message.content))
    finally:
        await client.close()


def _turns(started: float, sent: List[tuple]) -> List[dict]:
    out, previous = [], started
    for number, (at, agent, message) in enumerate(sent):
        out.append({"turn": number, "agent": agent, "seconds": at - previous, "chars": len(message or "")})
        previous = at
    return out
