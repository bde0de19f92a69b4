"""Memory admitted in bytes through the real stack: a flood of long requests under a KV
budget for two at a time loses nothing and gets no 5xx; the worker's accounting never
passes the budget; the context served is what the budget holds, and a request beyond it
is a 4xx that says why; the worker serves on."""
import concurrent.futures
import re

import pytest
import requests
from transformers import AutoTokenizer

from helpers import ag2_long_chat, running_stack, worker_address

pytestmark = [pytest.mark.slow]

M = "tinyllm-budget"
BUDGET_MB = 3  # the model's bf16 KV is 1 KiB a position: two ~1,100-position requests at a time


@pytest.fixture(scope="module")
def stack(tiny_tools, tmp_path_factory):
    with running_stack(model_path=str(tiny_tools), model_name=M, log_dir=tmp_path_factory.mktemp("budget"),
                       worker_args=["--kv-budget-mb", str(BUDGET_MB)]) as s:
        yield s


def long_question(tokenizer, i: int, tokens: int) -> str:
    words = [f"fox{(i * 13 + j) % 97} jumps" for j in range(tokens)]
    text = " ".join(words)
    ids = tokenizer(text).input_ids[:tokens]
    return tokenizer.decode(ids)


def complete(stack, prompt: str, max_tokens: int) -> requests.Response:
    return requests.post(stack.base_url + "/completions", timeout=600, json={
        "model": M, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def engine_stats(stack) -> dict:
    return requests.post(worker_address(stack) + "/worker_engine_stats", timeout=10).json()


def test_a_flood_of_long_requests_under_a_small_budget_loses_nothing(stack, tiny_tools):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tools))
    prompts = [long_question(tokenizer, i, 1000) for i in range(8)]
    alone = [complete(stack, p, 64) for p in prompts[:2]]
    assert all(r.status_code == 200 for r in alone), [r.text for r in alone]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        flooded = list(pool.map(lambda p: complete(stack, p, 64), prompts))
    assert [r.status_code for r in flooded] == [200] * 8, [r.text[:200] for r in flooded]
    # Every answer is a whole one (greedy invariance under concurrency has its own tests:
    # test_batched_serving, test_lean_served).
    assert all(r.json()["choices"][0]["finish_reason"] in ("stop", "length") for r in flooded)
    budget = engine_stats(stack)["kv_budget"]
    assert budget["budget_bytes"] == BUDGET_MB << 20
    assert budget["waited"] >= 1, budget  # the flood did queue on memory
    assert budget["peak_bytes"] <= budget["budget_bytes"] and budget["reserved_bytes"] == 0


def test_the_context_is_what_the_budget_holds_and_a_longer_prompt_is_a_40303_with_counts(stack, tiny_tools):
    """3 MiB hold 3,072 positions of the model's 4,096: the worker serves a 3,072-token
    context, so a prompt that fits gets its max_tokens trimmed to the rest (FastChat's own
    rule at the context), and a longer one the 40303 with both counts that agent clients
    trim their history on. The worker serves on."""
    details = requests.post(worker_address(stack) + "/model_details", json={"model": M}, timeout=10).json()
    assert details["context_length"] == (BUDGET_MB << 20) // 1024 == 3072
    start_up = (stack.log_dir / "worker.out").read_text()
    assert "Context: 3072 positions, what the KV budget holds (the model's own: 4096)" in start_up
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tools))
    fits = complete(stack, long_question(tokenizer, 98, 3000), 1000)
    assert fits.status_code == 200, fits.text[:300]
    usage = fits.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 3072
    r = complete(stack, long_question(tokenizer, 99, 3500), 16)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["code"] == 40303
    assert re.search(r"maximum context length is 3072 tokens\. However, your messages resulted in \d+ tokens",
                     body["message"]), body["message"]
    again = complete(stack, "the quick brown fox", 8)
    assert again.status_code == 200 and again.json()["choices"][0]["text"] is not None


def test_an_agent_chat_outgrowing_the_budget_keeps_going_trimmed(stack, tiny_tools):
    """ag2 through ``autogen_local``: the history passes the 3,072 positions the budget
    holds by the fifth turn; every turn is answered, the last from a trimmed history."""
    import autogen_local
    from openai import BadRequestError

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tools))
    turn = long_question(tokenizer, 7, 700)
    untrimmed = autogen_local.model_config(M, stack.base_url, wait=False, history_limit=False, max_tokens=4)
    with pytest.raises(BadRequestError, match="maximum context length is 3072 tokens"):
        ag2_long_chat(untrimmed, turns=6, turn_text=turn)
    reply = ag2_long_chat(autogen_local.model_config(M, stack.base_url, wait=False, max_tokens=4), 6, turn)
    assert 0 < reply.response.usage.prompt_tokens <= 3072 - 4


def test_a_request_beyond_the_budget_sent_to_the_worker_itself_is_a_clear_error(stack):
    """Past the API server (its own clients, FastChat's other front ends): a request whose
    KV can never fit is refused with the numbers, and the worker serves on."""
    r = requests.post(worker_address(stack) + "/worker_generate", timeout=60, json={
        "model": M, "prompt": "the quick brown fox", "max_new_tokens": 5000, "temperature": 0})
    body = r.json()
    assert body["error_code"] == 40303 and "--kv-budget-mb" in body["text"] and "MiB" in body["text"], body
    again = complete(stack, "the quick brown fox", 8)
    assert again.status_code == 200
