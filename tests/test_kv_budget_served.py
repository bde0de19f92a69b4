"""Memory admitted in bytes through the real stack: a flood of long requests under a KV
budget for two at a time loses nothing and gets no 5xx; the worker's accounting never
passes the budget; a request that can never fit is
a 400 that says why, and the worker serves on."""
import concurrent.futures

import pytest
import requests
from transformers import AutoTokenizer

from helpers import running_stack, worker_address

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


def test_a_request_that_can_never_fit_is_a_clear_400_and_the_worker_serves_on(stack, tiny_tools):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tools))
    r = complete(stack, long_question(tokenizer, 99, 3000), 1000)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["code"] == 40303 and "--kv-budget-mb" in body["message"] and "MiB" in body["message"]
    again = complete(stack, "the quick brown fox", 8)
    assert again.status_code == 200 and again.json()["choices"][0]["text"] is not None
