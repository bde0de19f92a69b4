"""A llama.cpp chat loop for ``bench --against llama-cpp``, run as a script by path so
its process holds only Python and llama-cpp-python (not this package, FastChat or torch)
and its peak RSS is llama.cpp's own.

Protocol: one JSON request per stdin line, one JSON answer per stdout line.
``{"chat": messages, "max_tokens": n}`` -> ``{"ttft_s", "total_s", "text"}``;
``{"prompt_ids": [ids], "max_tokens": n}`` -> the same, for a prompt the bench tokenized
(a bench model's word vocabulary, which llama.cpp cannot tokenize itself);
``{"count": text}`` -> ``{"tokens"}``; ``{"peak_rss_mb": true}`` -> ``{"peak_rss_mb"}``.
"""
import json
import sys
import time


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def timed(chunks, delta_of) -> dict:
    """Time to first text, total time and the text of one streamed answer."""
    began, first, text = time.perf_counter(), None, ""
    for chunk in chunks:
        delta = delta_of(chunk["choices"][0])
        if delta:
            first = first or time.perf_counter()
            text += delta
    ended = time.perf_counter()
    return {"ttft_s": (first or ended) - began, "total_s": ended - began, "text": text}


def main(gguf_path: str, threads: int, n_ctx: int, prompt_cache_mb: int) -> None:
    import llama_cpp

    started = time.perf_counter()
    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    if prompt_cache_mb:
        llm.set_cache(llama_cpp.LlamaRAMCache(capacity_bytes=prompt_cache_mb << 20))
    print(json.dumps({"ready": True, "load_s": time.perf_counter() - started}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "chat" in request:
            answer = timed(llm.create_chat_completion(request["chat"], max_tokens=request["max_tokens"],
                                                      temperature=0, stream=True),
                           lambda choice: choice["delta"].get("content"))
        elif "prompt_ids" in request:
            answer = timed(llm.create_completion(request["prompt_ids"], max_tokens=request["max_tokens"],
                                                 temperature=0, stream=True),
                           lambda choice: choice["text"])
        elif "count" in request:
            answer = {"tokens": len(llm.tokenize(request["count"].encode("utf-8"), add_bos=False, special=False))}
        else:
            answer = {"peak_rss_mb": peak_rss_mb()}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
