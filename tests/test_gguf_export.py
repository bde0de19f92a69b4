"""The bench model as a GGUF for llama.cpp (``bench.gguf_export``): read back by this
package's own GGUF reader (the one the demo model's real GGUF is served through), the
weights, shape and vocabulary are the checkpoint's; with llama-cpp-python installed,
llama.cpp itself computes the Hugging Face forward's logits from it."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fastchat_bigdl.bench.gguf_export import (NotExportable, add_word_vocabulary, export_gguf, permute_rope,
                                               word_vocabulary, write_gguf)
from fastchat_bigdl.bench.random_model import LlamaShape, build_random_llama
from fastchat_bigdl.lowbit.gguf_checkpoint import hf_config, hf_shards, unpermute_rope

# grouped-query attention, so Q and K are permuted with different head counts
SHAPE = LlamaShape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=300, context=256)


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory) -> Path:
    return build_random_llama(tmp_path_factory.mktemp("models") / "bench-gqa", SHAPE)


def read_back(gguf_path: Path):
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    config = hf_config(reader)
    tensors = {}
    for shard in hf_shards(reader, config):
        tensors.update(shard)
    return reader, config, tensors


def checkpoint(model: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for shard in model.glob("*.safetensors"):
        tensors.update({k: v.float().numpy() for k, v in load_file(str(shard)).items()})
    return tensors


def test_rope_permutation_is_the_inverse_of_the_readers():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert not np.array_equal(permute_rope(w, 8), w)
    assert np.array_equal(unpermute_rope(permute_rope(w, 8), 8), w)


def test_f32_export_reads_back_exactly(bench_model, tmp_path):
    reader, config, tensors = read_back(export_gguf(bench_model, tmp_path / "m.gguf", "f32"))
    original = checkpoint(bench_model)
    assert set(tensors) == set(original)
    for name, value in original.items():
        assert np.array_equal(tensors[name], value), name
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (128, 2, 256)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (4, 2, 300)
    assert config["tie_word_embeddings"] is False
    pieces = [bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode()
              for i in reader.fields["tokenizer.ggml.tokens"].data[:5]]
    assert pieces == ["<unk>", "<s>", "</s>", "\u2581w3", "\u2581w4"]  # decodes as " w3 w4"


def test_q4_0_export_is_4_bit_and_close(bench_model, tmp_path):
    from gguf import GGMLQuantizationType

    out = export_gguf(bench_model, tmp_path / "m.gguf")
    reader, _, tensors = read_back(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q4_0
    assert types["output.weight"] == GGMLQuantizationType.Q4_0
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32  # norms stay exact
    original = checkpoint(bench_model)
    for name, value in original.items():
        scale = np.abs(value).max()
        assert np.abs(tensors[name] - value).max() <= scale / 7 + 1e-6, name  # half a 4-bit step at most
    f32_size = export_gguf(bench_model, tmp_path / "f.gguf", "f32").stat().st_size
    assert out.stat().st_size < f32_size / 5
    mtime = out.stat().st_mtime_ns
    assert export_gguf(bench_model, out).stat().st_mtime_ns == mtime  # reused, not rewritten


def test_what_it_cannot_export_is_refused(tiny_llama, bench_model, tmp_path):
    with pytest.raises(NotExportable, match="not the bench's word-level one"):
        export_gguf(tiny_llama, tmp_path / "t.gguf")  # a BPE tokenizer: use the model's own GGUF
    with pytest.raises(NotExportable, match="writes q4_0, f32"):
        export_gguf(bench_model, tmp_path / "t.gguf", "q8_0")
    assert not list(tmp_path.glob("t.gguf*"))


def test_the_bench_refuses_other_configs_but_the_writer_takes_them(bench_model, tmp_path):
    """``export_gguf`` keeps to plain Llamas; ``write_gguf`` (which the tests' tiny-model
    GGUFs go through) writes any config, under the architecture and with the vocabulary
    its caller gives."""
    from gguf import GGMLQuantizationType, GGUFReader

    scaled = Path(shutil.copytree(bench_model, tmp_path / "scaled"))
    config = json.loads((scaled / "config.json").read_text())
    config["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (scaled / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotExportable, match="not a plain Llama"):
        export_gguf(scaled, tmp_path / "s.gguf")
    vocabulary = word_vocabulary(scaled)
    out = write_gguf(scaled, tmp_path / "s.gguf", config,
                     lambda writer: add_word_vocabulary(writer, *vocabulary), "Q8_0", arch="qwen2")
    reader = GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert reader.fields["qwen2.attention.head_count_kv"].contents() == 2
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.1.attn_k.weight"] == GGMLQuantizationType.Q8_0
    assert types["output_norm.weight"] == GGMLQuantizationType.F32
    assert not list(tmp_path.glob("*.partial"))


def test_llama_cpp_computes_the_same_logits_from_it(bench_model, tmp_path):
    """The real peer on the exported file: llama.cpp's logits match the Hugging Face
    forward's (f32 export: only summation order differs), and its text is the words."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import torch
    from transformers import AutoModelForCausalLM

    gguf = export_gguf(bench_model, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    ids = [1, 17, 250, 3, 99, 42, 7]
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    model = AutoModelForCausalLM.from_pretrained(str(bench_model), torch_dtype=torch.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - ours).max() < 1e-3 * max(1.0, np.abs(ours).max())
    assert llm.detokenize([17, 250, 3]).decode() == " w17 w250 w3"
