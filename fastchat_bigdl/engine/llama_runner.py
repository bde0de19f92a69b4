"""A lean forward for decoder-only transformers on the low-bit library's CPU kernels:
Llama and the families that differ from it only in what ``Layer`` and ``RunnerShape``
describe (``engine/families.py`` reads those from a model).

The Hugging Face forward spends about half of a token's time on ~700 small ops and
their Python (measured on the demo model: 151 low-bit linear calls take ~15 ms of a
30-37 ms token). This runner (after gpt-fast's ``model.py``) keeps the weights where the
library put them and does per layer: RMSNorm, the q/k/v projections (one fused call
where the model has it), q/k norms where the model has them, RoPE from tables computed
once, keys and values written in place into a preallocated ``SequenceKV``, attention
(windowed, soft-capped where the layer says), and the gated MLP (SiLU or tanh-GELU).

Greedy output must not depend on what else the server does, and the low-bit kernel
rounds a row differently depending on the call: measured on a Xeon with AMX, a call of
fewer than 32 rows computes each row alone (vector dot products), a larger one computes
full 16-row tiles with a matrix kernel and the remaining rows alone. So every position is
computed by exactly one of two fixed recipes:

- prompt positions (``prefill``): in calls of ``PREFILL_BLOCK`` rows aligned to absolute
  positions (position p is always row p mod 64 of a full call; rows outside the new
  tokens are padding), the fast tiled path;
- generated positions (``decode``): in calls of at most ``decode_rows`` rows, below the
  tiled path's threshold, so a row's result is the same alone or batched.

Attention follows the same two recipes: a decode row attends alone over exactly the keys
its position sees; a prefill block attends in one call over the block's keys, masked. The
prefix cache reuses only prefill-computed positions (``SequenceKV.prefilled``), so a
request computes every position the same way cold or warm, alone or batched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from fastchat_bigdl.engine.kv_cache import SequenceKV, bytes_per_position, capacity_for
from fastchat_bigdl.lowbit.kernels import LowBitMatmul

PREFILL_BLOCK = 64  # rows per prefill call: measured 0.65 ms/row of linears vs 10 ms for one row
DECODE_ROWS = 16  # at most this many rows per decode call (the runner probes its kernel below it)
ROPE_TABLE_QUANTUM = 1024


@dataclass
class Layer:
    """One decoder layer: its weights where the library left them and what differs per
    layer (norm weights with any offset already folded in, e.g. Gemma's ``1 + w``)."""
    input_norm: torch.Tensor  # before attention
    post_norm: torch.Tensor  # before the MLP
    qkv: Sequence[LowBitMatmul]  # one fused call, or q, k, v
    o: LowBitMatmul
    down: LowBitMatmul
    gate: Optional[LowBitMatmul] = None
    up: Optional[LowBitMatmul] = None
    gate_up: Optional[LowBitMatmul] = None  # Phi-3: one call, gate columns first
    q_norm: Optional[torch.Tensor] = None  # Qwen3, Gemma 3: RMSNorm of each head of q and k
    k_norm: Optional[torch.Tensor] = None
    attn_out_norm: Optional[torch.Tensor] = None  # Gemma 2/3: on the attention's output
    mlp_out_norm: Optional[torch.Tensor] = None  # and on the MLP's
    window: Optional[int] = None  # keys a position sees (sliding window), None: all before it
    rope: int = 0  # which of the runner's rotary embeddings (Gemma 3's local layers have their own)


@dataclass
class Rope:
    """Rotary embedding as transformers computes it: ``inv_freq`` (scaling such as
    ``llama3`` or YaRN already folded in; half the rotated dimensions, fewer than the
    head's for partial rotary), positions divided by ``position_scale`` (linear scaling
    in transformers before 4.45), cos and sin multiplied by ``attention_scaling`` (YaRN's,
    longrope's). Longrope (Phi-3): positions from ``long_from`` on use ``long_inv_freq``
    (per position, as vLLM does, so a position's table never depends on the length)."""
    inv_freq: torch.Tensor
    position_scale: float = 1.0
    attention_scaling: float = 1.0
    long_inv_freq: Optional[torch.Tensor] = None
    long_from: Optional[int] = None

    def table(self, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [size, rotated dims] for positions [0, size) (fp32)."""
        inv_freq = self.inv_freq.float()
        t = torch.arange(size, dtype=inv_freq.dtype)
        if self.position_scale != 1.0:
            t = t / self.position_scale
        freqs = torch.outer(t, inv_freq)
        if self.long_inv_freq is not None and size > self.long_from:
            freqs[self.long_from:] = torch.outer(t[self.long_from:], self.long_inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        # rotate_half(x) * sin == roll(x, half) * [-sin, sin]: one roll instead of slices and a cat
        sin[:, :inv_freq.numel()] = -sin[:, :inv_freq.numel()]
        return cos, sin


@dataclass
class RunnerShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    norm_eps: float
    context: int
    activation: str = "silu"  # of the gated MLP: "silu" or "gelu_tanh" (Gemma)
    embed_scale: float = 1.0  # Gemma: embeddings times sqrt(hidden)
    attention_scale: Optional[float] = None  # None: 1/sqrt(head_dim)
    attention_softcap: Optional[float] = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    logit_softcap: Optional[float] = None  # Gemma 2: the same on the final logits


class LlamaRunner:
    """Runs a converted Llama-family model; one ``SequenceKV`` per sequence."""

    def __init__(self, shape: RunnerShape, embed: torch.Tensor, layers: List[Layer],
                 final_norm: torch.Tensor, lm_head: LowBitMatmul, ropes: Sequence[Rope],
                 decode_rows: int = DECODE_ROWS, kv_dtype: torch.dtype = torch.float32,
                 prefill_line: str = "prefill blocks: the library's low-bit kernel"):
        self.shape = shape
        self.prefill_line = prefill_line  # how prefill blocks multiply (``prefill_recipe``)
        self.embed = embed
        self.layers = layers
        self.windows = tuple(layer.window for layer in layers)  # read by every attention call
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.ropes = list(ropes)
        self.decode_rows = decode_rows
        self.kv_dtype = kv_dtype
        self._tables: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def new_sequence(self, expected_positions: int = 0) -> SequenceKV:
        s = self.shape
        return SequenceKV(s.layers, s.kv_heads, s.head_dim, self.kv_dtype, capacity=max(1, expected_positions),
                          limit=s.context)

    def kv_bytes_per_position(self) -> int:
        s = self.shape
        return bytes_per_position(s.layers, s.kv_heads, s.head_dim, self.kv_dtype)

    def kv_bytes(self, positions: int) -> int:
        """What ``new_sequence(positions)`` allocates."""
        return capacity_for(positions, self.shape.context) * self.kv_bytes_per_position()

    def _rope_tables(self, end: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """cos and signed sin of every rotary embedding for positions [0, end), computed
        once per ``ROPE_TABLE_QUANTUM`` positions."""
        if not self._tables or self._tables[0][0].shape[0] < end:
            size = -(-end // ROPE_TABLE_QUANTUM) * ROPE_TABLE_QUANTUM
            self._tables = [rope.table(size) for rope in self.ropes]
        return self._tables

    def _check_room(self, end: int) -> None:
        if end > self.shape.context:
            raise ValueError(f"{end} positions exceed the model's context of {self.shape.context}")

    @staticmethod
    def block_room(kv: SequenceKV) -> int:
        """How many prompt tokens the next ``prefill_block`` call on ``kv`` may take: up to
        the end of the block its next position falls in (blocks are aligned to absolute
        positions). The one place a prompt is split."""
        return PREFILL_BLOCK - kv.length % PREFILL_BLOCK

    def prefill(self, tokens: Sequence[int], kv: SequenceKV, all_logits: bool = False) -> torch.Tensor:
        """A whole prompt, block by block (what the engine does one block per turn):
        the last token's logits [1, vocab], or every token's (``all_logits``)."""
        if not tokens:
            raise ValueError("nothing to prefill")
        self._check_room(kv.length + len(tokens))  # before any block changes ``kv``
        parts: List[torch.Tensor] = []
        while tokens:
            room = self.block_room(kv)
            piece, tokens = tokens[:room], tokens[room:]
            logits = self.prefill_block(piece, kv, all_logits=all_logits, next_logits=not tokens)
            if all_logits:
                parts.append(logits)
        return torch.cat(parts) if all_logits else logits

    def prefill_block(self, tokens: Sequence[int], kv: SequenceKV, all_logits: bool = False,
                      next_logits: bool = True) -> Optional[torch.Tensor]:
        """Feed prompt ``tokens`` (at most ``block_room(kv)``) after the ``kv.length``
        positions already in ``kv``, in one full block call; returns the logits of the last
        token [1, vocab], or of every token fed (``all_logits``), or nothing
        (``next_logits=False``: more of the prompt follows)."""
        return _run_to_end(self.prefill_block_steps(tokens, kv, all_logits, next_logits))

    @torch.inference_mode()
    def prefill_block_steps(self, tokens: Sequence[int], kv: SequenceKV, all_logits: bool = False,
                            next_logits: bool = True) -> Generator[None, None, Optional[torch.Tensor]]:
        """``prefill_block`` one layer at a time: yields after each layer, returns its result.
        The engine runs a few layers a turn between other streams' decode steps; the
        arithmetic is the same however the layers are spread over turns."""
        start, end = kv.length, kv.length + len(tokens)
        if not 0 < len(tokens) <= self.block_room(kv):
            raise ValueError(f"{len(tokens)} tokens do not fit the prefill block at position {start}")
        self._check_room(end)
        base = start - start % PREFILL_BLOCK
        kv.reserve(base + PREFILL_BLOCK)  # the block attends over all its keys
        ids = torch.zeros(PREFILL_BLOCK, dtype=torch.long)  # padding rows: token 0, never stored
        ids[start - base:end - base] = torch.as_tensor(tokens, dtype=torch.long)
        out = yield from self._layer_steps(self._embed(ids), PrefillBlock(self, kv, base, start - base, end - base))
        kv.length = kv.prefilled = end
        # The whole block through lm_head, so its rows round the same in any split; the
        # next token always comes from a one-row call: the same with or without all_logits.
        following = self._logits(out[end - base - 1:end - base]) if next_logits else None
        if not all_logits:
            return following
        logits = self._logits(out)[start - base:end - base]
        if following is not None:
            logits[-1:] = following
        return logits

    @torch.inference_mode()
    def decode(self, steps: Sequence[Tuple[int, SequenceKV]]) -> torch.Tensor:
        """One generated token for each (token, its sequence); returns logits [len(steps), vocab]."""
        if len(steps) > self.decode_rows:
            return torch.cat([self.decode(steps[i:i + self.decode_rows])
                              for i in range(0, len(steps), self.decode_rows)])
        for _, kv in steps:
            self._check_room(kv.length + 1)
            kv.reserve(kv.length + 1)
        ids = torch.tensor([token for token, _ in steps], dtype=torch.long)
        out = self._layers(self._embed(ids), DecodeRows(self, [kv for _, kv in steps]))
        for _, kv in steps:
            kv.length += 1
        return self._logits(out)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embed).float()  # a bf16 table (``compact_embeddings``) gives fp32 rows
        return x * self.shape.embed_scale if self.shape.embed_scale != 1.0 else x

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        s = self.shape
        logits = self.lm_head(F.rms_norm(hidden, (s.hidden,), self.final_norm, s.norm_eps))
        return _softcap(logits, s.logit_softcap)

    def _layers(self, x: torch.Tensor, call: "RunnerCall") -> torch.Tensor:
        return _run_to_end(self._layer_steps(x, call))

    def _layer_steps(self, x: torch.Tensor, call: "RunnerCall") -> Generator[None, None, torch.Tensor]:
        """Every layer over the rows of ``x``, yielding after each; ``call`` (a prefill
        block or decode rows) says where each row sits, which rows store keys and values,
        and how they attend. Returns the last layer's output."""
        s = self.shape
        n = x.shape[0]
        heads, kv_heads, dim = s.heads, s.kv_heads, s.head_dim
        rotations = [(cos[call.positions, None, :], sin[call.positions, None, :])
                     for cos, sin in self._rope_tables(int(call.positions.max()) + 1)]
        attn = torch.zeros(n, heads * dim)
        for index, layer in enumerate(self.layers):
            h = F.rms_norm(x, (s.hidden,), layer.input_norm, s.norm_eps)
            if len(layer.qkv) == 1:
                qkv = layer.qkv[0](h).view(n, heads + 2 * kv_heads, dim)
            else:
                qkv = torch.cat([proj(h) for proj in layer.qkv], dim=1).view(n, heads + 2 * kv_heads, dim)
            qk = qkv[:, :heads + kv_heads]
            if layer.q_norm is not None:
                qk = torch.cat([F.rms_norm(qk[:, :heads], (dim,), layer.q_norm, s.norm_eps),
                                F.rms_norm(qk[:, heads:], (dim,), layer.k_norm, s.norm_eps)], dim=1)
            qk = _rotate(qk, *rotations[layer.rope])
            call.store(index, qk[:, heads:], qkv[:, heads + kv_heads:])
            call.attend(index, qk[:, :heads], attn)
            x = x + _maybe_norm(layer.o(attn), layer.attn_out_norm, s)
            h = F.rms_norm(x, (s.hidden,), layer.post_norm, s.norm_eps)
            x = x + _maybe_norm(layer.down(self._gated(layer, h)), layer.mlp_out_norm, s)
            yield
        return x

    def _gated(self, layer: Layer, h: torch.Tensor) -> torch.Tensor:
        if layer.gate_up is not None:
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
        else:
            gate, up = layer.gate(h), layer.up(h)
        act = F.silu(gate) if self.shape.activation == "silu" else F.gelu(gate, approximate="tanh")
        act *= up
        return act


def _run_to_end(steps: Generator):
    """What a step-by-step generator (``_layer_steps``, ``prefill_block_steps``) returns, run at once."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _rotate(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` dimensions of each head (all but for partial rotary)."""
    rotated = cos.shape[-1]
    if rotated == qk.shape[-1]:
        return qk * cos + qk.roll(rotated // 2, dims=-1) * sin
    part = qk[..., :rotated]
    return torch.cat([part * cos + part.roll(rotated // 2, dims=-1) * sin, qk[..., rotated:]], dim=-1)


def _maybe_norm(x: torch.Tensor, weight: Optional[torch.Tensor], shape: RunnerShape) -> torch.Tensor:
    return x if weight is None else F.rms_norm(x, (x.shape[-1],), weight, shape.norm_eps)


def _softcap(x: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              shape: RunnerShape) -> torch.Tensor:
    """Scaled dot-product attention of q [1, H, n, d] over k, v [1, KV, L, d] (H a
    multiple of KV; all fp32, or all bf16: SDPA accumulates in fp32); spelled out in fp32
    where the scores are soft-capped (SDPA cannot; the heads are copied per group anyway)."""
    if shape.attention_softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=shape.attention_scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    q, k, v = q.float(), k.float(), v.float()
    scale = shape.attention_scale if shape.attention_scale is not None else q.shape[-1] ** -0.5
    scores = _softcap(q @ k.transpose(-1, -2) * scale, shape.attention_softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


class PrefillBlock:
    """The prefill recipe: one call of ``PREFILL_BLOCK`` rows at absolute positions
    ``base ...``; rows ``[first, stop)`` are the new prompt tokens of ``kv`` (the others
    only fill the call: their outputs are never read). Attention in one call over the
    block's keys, masked: a row's result depends only on its query, the keys up to it and
    the call's shape, which the alignment fixes, so it is the same in any split of the
    prompt. Keys not written yet are zeros (``SequenceKV`` allocates zeroed), so masked
    positions add exact zeros."""

    def __init__(self, runner: LlamaRunner, kv: SequenceKV, base: int, first: int, stop: int):
        self.shape, self.kv, self.base, self.first, self.stop = runner.shape, kv, base, first, stop
        self.windows = runner.windows
        self.positions = torch.arange(base, base + PREFILL_BLOCK)
        self._masks = {}

    def mask(self, window: Optional[int]) -> torch.Tensor:
        """Causal, and within ``window`` keys (transformers' rule: key > query - window)."""
        if window not in self._masks:
            query = self.positions[:, None]
            key = torch.arange(self.base + PREFILL_BLOCK)[None, :]
            mask = key <= query
            if window:
                mask &= key > query - window
            self._masks[window] = mask
        return self._masks[window]

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.kv.write(layer, self.base + self.first, keys[self.first:self.stop], values[self.first:self.stop])

    def attend(self, layer: int, queries: torch.Tensor, attn: torch.Tensor) -> None:
        s = self.shape
        mask = self.mask(self.windows[layer])
        n, keys = mask.shape
        q = queries.transpose(0, 1)[None].to(self.kv.attention_dtype)
        out = attention(q, self.kv.keys(layer, 0, keys)[None], self.kv.values(layer, 0, keys)[None], mask, s)
        attn.copy_(out[0].transpose(0, 1).reshape(n, s.heads * s.head_dim))


class DecodeRows:
    """The decode recipe: row i is the next position of ``kvs[i]``, at most
    ``decode_rows`` rows a call (where the kernel rounds each row as if alone). Each row
    attends alone over exactly the keys its position sees: the same shapes and the same
    arithmetic whatever else is in the call."""

    def __init__(self, runner: LlamaRunner, kvs: List[SequenceKV]):
        self.shape, self.kvs, self.windows = runner.shape, kvs, runner.windows
        self.positions = torch.tensor([kv.length for kv in kvs])

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        for row, kv in enumerate(self.kvs):
            kv.write(layer, kv.length, keys[row:row + 1], values[row:row + 1])

    def attend(self, layer: int, queries: torch.Tensor, attn: torch.Tensor) -> None:
        s = self.shape
        for row, kv in enumerate(self.kvs):
            stop, window = kv.length + 1, self.windows[layer]
            first = max(0, stop - window) if window else 0
            q = queries[row].view(1, s.kv_heads, s.heads // s.kv_heads, s.head_dim).to(kv.attention_dtype)
            out = attention(q, kv.keys(layer, first, stop)[None], kv.values(layer, first, stop)[None], None, s)
            attn[row] = out.view(-1)


RunnerCall = Union[PrefillBlock, DecodeRows]
