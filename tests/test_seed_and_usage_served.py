"""What FastChat's chat handler drops, through the real stack: ``seed`` (the same seeded
request at temperature 1 gives the same tokens again, streamed or not, alone or while
other requests run; each of ``n`` choices has its own) and
``stream_options.include_usage`` (a last chunk with the usage and no choices)."""
import concurrent.futures
import json

import pytest
import requests

from helpers import running_stack

pytestmark = [pytest.mark.slow]

M = "tinyllm-seeded"
ASK = [{"role": "user", "content": "tell me about the quick brown fox"}]


@pytest.fixture(scope="module")
def stack(tiny_chatml, tmp_path_factory):
    with running_stack(model_path=str(tiny_chatml), model_name=M, log_dir=tmp_path_factory.mktemp("seeded")) as s:
        yield s


def chat(stack, **body):
    data = {"model": M, "messages": ASK, "max_tokens": 24, "temperature": 1.0, "top_p": 1.0, **body}
    r = requests.post(stack.base_url + "/chat/completions", json=data, timeout=300)
    assert r.status_code == 200, r.text
    return r


def texts(response):
    # Streams drop U+FFFD (a random model's broken byte sequences), as FastChat's do.
    return [c["message"]["content"].replace("\ufffd", "") for c in response.json()["choices"]]


def streamed(response):
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    assert response.text.rstrip().endswith("data: [DONE]")
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    return text, events


def test_the_same_seed_gives_the_same_sampled_answer_and_another_seed_another(stack):
    first = texts(chat(stack, seed=7))
    assert texts(chat(stack, seed=7)) == first
    others = {texts(chat(stack, seed=seed))[0] for seed in (8, 9, 10)}
    assert others - {first[0]}  # the seed, not greedy decoding, made them equal


def test_a_seeded_answer_does_not_depend_on_other_requests(stack):
    alone = texts(chat(stack, seed=11, max_tokens=32))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        noise = [pool.submit(chat, stack, max_tokens=48, messages=[{"role": "user", "content": f"noise {i}"}])
                 for i in range(3)]
        busy = pool.submit(chat, stack, seed=11, max_tokens=32)
        assert texts(busy.result()) == alone
        for f in noise:
            f.result()


def test_streamed_and_whole_seeded_answers_match_and_each_choice_has_its_seed(stack):
    whole = texts(chat(stack, seed=3, n=2))
    assert whole == texts(chat(stack, seed=3, n=2)) and whole[0] != whole[1]
    text, _ = streamed(chat(stack, seed=3, stream=True))
    assert text == whole[0]


def test_include_usage_ends_the_stream_with_the_usage(stack):
    whole_response = chat(stack, seed=5)
    whole = whole_response.json()
    text, events = streamed(chat(stack, seed=5, stream=True, stream_options={"include_usage": True}))
    assert text == texts(whole_response)[0]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    assert all(e["choices"] for e in events[:-1])
    _, plain = streamed(chat(stack, seed=5, stream=True))
    assert all(e["choices"] for e in plain)  # asked only when asked


@pytest.mark.parametrize("body,words", [({"seed": "seven"}, "'seed' must be an integer"),
                                        ({"seed": 1.5}, "'seed' must be an integer"),
                                        ({"stream_options": {"include_usage": "yes"}}, "stream_options")])
def test_bad_seeds_and_stream_options_get_a_400(stack, body, words):
    r = requests.post(stack.base_url + "/chat/completions", json={"model": M, "messages": ASK, **body}, timeout=60)
    assert r.status_code == 400 and words in r.json()["message"]
