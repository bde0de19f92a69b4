"""What FastChat's chat handler drops, through the real stack: ``seed`` (the same seeded
request at temperature 1 gives the same tokens again, streamed or not, alone or while
other requests run; each of ``n`` choices has its own),
``stream_options.include_usage`` (a last chunk with the usage and no choices) and
``logprobs``/``top_logprobs`` (OpenAI's chat shape, streamed and not)."""
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


def post(stack, path, **body):
    data = {"model": M, "max_tokens": 24, "temperature": 1.0, "top_p": 1.0, **body}
    r = requests.post(stack.base_url + path, json=data, timeout=300)
    assert r.status_code == 200, r.text
    return r


def chat(stack, **body):
    return post(stack, "/chat/completions", **{"messages": ASK, **body})


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
                                        ({"stream_options": {"include_usage": "yes"}}, "stream_options"),
                                        ({"logprobs": 3}, "'logprobs' must be true or false"),
                                        ({"top_logprobs": 2}, "'top_logprobs' needs 'logprobs': true"),
                                        ({"logprobs": True, "top_logprobs": 21}, "'top_logprobs'")])
def test_bad_seeds_and_stream_options_get_a_400(stack, body, words):
    r = requests.post(stack.base_url + "/chat/completions", json={"model": M, "messages": ASK, **body}, timeout=60)
    assert r.status_code == 400 and words in r.json()["message"]


def test_chat_logprobs_give_each_generated_token_and_its_alternatives(stack):
    """Greedy: every chosen token is its step's most likely one, so its logprob is the first
    of its ``top_logprobs`` (at most as many as asked, most likely first); one entry per
    generated token; the stream carries the same entries spread over its chunks."""
    body = {"temperature": 0, "logprobs": True, "top_logprobs": 3}
    whole = chat(stack, **body).json()
    choice = whole["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == whole["usage"]["completion_tokens"] > 0
    # a token's text as decoded alone (part of a character shows as U+FFFD, as in OpenAI's)
    whole_tokens = [e["token"] for e in content if "\ufffd" not in e["token"]]
    assert all(t in choice["message"]["content"] for t in whole_tokens)
    for entry in content:
        top = entry["top_logprobs"]
        assert 1 <= len(top) <= 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert entry["logprob"] == pytest.approx(top[0]["logprob"]) and entry["logprob"] <= 0
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
    _, events = streamed(chat(stack, stream=True, **body))
    streamed_content = [e for ev in events for c in ev["choices"] for e in (c.get("logprobs") or {}).get("content", [])]
    assert streamed_content == content
    plain = chat(stack, temperature=0).json()
    assert plain["choices"][0].get("logprobs") is None  # only when asked
    only_chosen = chat(stack, temperature=0, logprobs=True).json()["choices"][0]["logprobs"]["content"]
    assert [e["logprob"] for e in only_chosen] == [e["logprob"] for e in content]
    assert all(e["top_logprobs"] == [] for e in only_chosen)


# --- /v1/completions: FastChat's handler drops the seed and the usage chunk too ---------------

PROMPT = "the quick brown fox"


def complete(stack, **body):
    return post(stack, "/completions", **{"prompt": PROMPT, **body})


def completion_texts(response):
    return [c["text"].replace("\ufffd", "") for c in response.json()["choices"]]


def streamed_completion(response):
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    assert response.text.rstrip().endswith("data: [DONE]")
    texts_by_choice = {}
    for e in events:
        for c in e["choices"]:
            texts_by_choice[c["index"]] = texts_by_choice.get(c["index"], "") + c["text"]
    return [texts_by_choice[i] for i in sorted(texts_by_choice)], events


def test_a_seeded_completion_is_reproducible_alone_and_under_load(stack):
    first = completion_texts(complete(stack, seed=7))
    assert completion_texts(complete(stack, seed=7)) == first
    others = {completion_texts(complete(stack, seed=seed))[0] for seed in (8, 9, 10)}
    assert others - {first[0]}  # the seed, not greedy decoding, made them equal
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        noise = [pool.submit(complete, stack, prompt=f"noise {i}", max_tokens=48) for i in range(3)]
        busy = pool.submit(complete, stack, seed=7)
        assert completion_texts(busy.result()) == first
        for f in noise:
            f.result()


def test_seeded_completion_choices_differ_and_the_stream_carries_the_same_text_and_usage(stack):
    whole = complete(stack, seed=3, n=2, prompt=[PROMPT, "hello world"])
    texts_ = completion_texts(whole)
    assert len(texts_) == 4 and len(set(texts_)) == 4 and texts_ == completion_texts(
        complete(stack, seed=3, n=2, prompt=[PROMPT, "hello world"]))
    assert [c["index"] for c in whole.json()["choices"]] == [0, 1, 2, 3]
    single = complete(stack, seed=5)
    text, events = streamed_completion(complete(stack, seed=5, stream=True, stream_options={"include_usage": True}))
    assert text == completion_texts(single)
    assert events[-1]["choices"] == [] and events[-1]["usage"] == single.json()["usage"]
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    _, plain = streamed_completion(complete(stack, seed=5, stream=True))
    assert all(e["choices"] for e in plain)  # the usage chunk only when asked


def test_unseeded_completions_still_go_through_fastchats_handler(stack):
    greedy = completion_texts(complete(stack, temperature=0))
    assert greedy == completion_texts(complete(stack, temperature=0, seed=1))  # greedy ignores the seed
    r = requests.post(stack.base_url + "/completions", json={"model": M, "prompt": PROMPT, "seed": "x"}, timeout=60)
    assert r.status_code == 400 and "'seed' must be an integer" in r.json()["message"]


def test_seeded_completion_logprobs_stream_each_token_once(stack):
    whole = complete(stack, seed=9, logprobs=2).json()["choices"][0]["logprobs"]
    _, events = streamed_completion(complete(stack, seed=9, logprobs=2, stream=True))
    tokens = [t for e in events for c in e["choices"] for t in (c["logprobs"] or {}).get("tokens", [])]
    assert tokens == whole["tokens"] and len(tokens) > 0
