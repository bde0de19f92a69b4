"""The job users run this package for, timed: a classic AutoGen two-agent chat (pyautogen
0.2 / ag2, configured by ``autogen_local.config()``) against the served stack, with the
time of each agent turn. At 7B a turn takes tens of seconds; the point is that nothing
times out, runs out of memory or needs a restart, whatever the words are.
"""
from __future__ import annotations

import time
from typing import Callable, List

TASK = "Write a short plan for a picnic, then improve it turn by turn."


def run_agent_chat(base_url: str, turns: int, max_tokens: int, progress: Callable[[str], None]) -> dict:
    """About ``turns`` agent replies (the agents alternate, the critic answering last: an
    odd number is exact) of at most ``max_tokens`` each; returns each turn's seconds and
    reply length, or the error."""
    try:
        import autogen
    except ImportError:
        return {"error": "pyautogen (or ag2) is not installed: pip install \"fastchat-bigdl[autogen]\""}
    from autogen_local import config

    llm_config = config(base_url=base_url, max_tokens=max_tokens, wait=60)
    writer = autogen.AssistantAgent("writer", llm_config=llm_config,
                                    system_message="You write short plans.")
    critic = autogen.AssistantAgent("critic", llm_config=llm_config,
                                    system_message="You point out one thing to improve.")
    sent: List[tuple] = []

    def stamp(sender, message, recipient, silent):
        sent.append((time.perf_counter(), sender.name, message))
        return message

    for agent in (writer, critic):
        agent.register_hook("process_message_before_send", stamp)
    progress(f"  AutoGen two-agent chat ({autogen.__version__}), {turns} turns ...")
    started = time.perf_counter()
    try:
        # one round: the writer sends (the task first, then a reply), the critic answers
        writer.initiate_chat(critic, message=TASK, max_turns=turns // 2 + 1, silent=True)
    except Exception as exc:  # the failure is the result: it goes into the report
        return {"error": f"{type(exc).__name__}: {exc}", "turns": _turns(started, sent)[1:]}
    replies = _turns(started, sent)[1:]  # the first message is the task, not a model turn
    for t in replies:
        progress(f"    turn {t['turn']} ({t['agent']}): {t['seconds']:.1f} s, {t['chars']} chars")
    return {"turns": replies, "total_s": sum(t["seconds"] for t in replies), "error": None}


def _turns(started: float, sent: List[tuple]) -> List[dict]:
    out, previous = [], started
    for number, (at, agent, message) in enumerate(sent):
        text = message.get("content") if isinstance(message, dict) else message
        out.append({"turn": number, "agent": agent, "seconds": at - previous, "chars": len(text or "")})
        previous = at
    return out
