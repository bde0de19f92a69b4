"""A lean forward for Llama-family decoders on the low-bit library's CPU kernels.

The Hugging Face forward spends about half of a token's time on ~700 small ops and
their Python (measured on the demo model: 151 low-bit linear calls take ~15 ms of a
30-37 ms token). This runner (after gpt-fast's ``model.py``) keeps the weights where the
library put them and does per layer: RMSNorm, one fused q/k/v call, RoPE from tables
computed once, keys and values written in place into a preallocated ``SequenceKV``,
attention, and the gated SiLU MLP.

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
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from fastchat_bigdl.engine.kv_cache import SequenceKV
from fastchat_bigdl.lowbit.kernels import LowBitMatmul

PREFILL_BLOCK = 64  # rows per prefill call: measured 0.65 ms/row of linears vs 10 ms for one row
DECODE_ROWS = 16  # at most this many rows per decode call (the runner probes its kernel below it)
ROPE_TABLE_QUANTUM = 1024


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Sequence[LowBitMatmul]  # one fused call, or q, k, v
    o: LowBitMatmul
    gate: LowBitMatmul
    up: LowBitMatmul
    down: LowBitMatmul


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
    sliding_window: Optional[int] = None


class LlamaRunner:
    """Runs a converted Llama-family model; one ``SequenceKV`` per sequence."""

    def __init__(self, shape: RunnerShape, embed: torch.Tensor, layers: List[LayerWeights],
                 final_norm: torch.Tensor, lm_head: LowBitMatmul, inv_freq: torch.Tensor,
                 position_scale: float = 1.0, decode_rows: int = DECODE_ROWS):
        self.shape = shape
        self.embed = embed
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.inv_freq = inv_freq.float()
        self.position_scale = position_scale
        self.decode_rows = decode_rows
        self._cos = self._sin = torch.empty(0, shape.head_dim)

    def new_sequence(self, expected_positions: int = 0) -> SequenceKV:
        s = self.shape
        return SequenceKV(s.layers, s.kv_heads, s.head_dim, capacity=max(1, expected_positions), limit=s.context)

    def _rope(self, end: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for positions [0, end), as Hugging Face's rotary embedding
        computes them (fp32, positions divided by the linear scaling factor)."""
        if self._cos.shape[0] < end:
            size = -(-end // ROPE_TABLE_QUANTUM) * ROPE_TABLE_QUANTUM
            t = torch.arange(size, dtype=self.inv_freq.dtype)
            if self.position_scale != 1.0:
                t = t / self.position_scale
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            half = self.shape.head_dim // 2
            sin = emb.sin()
            # rotate_half(x) * sin == roll(x, half) * [-sin, sin]: one roll instead of slices and a cat
            sin[:, :half] = -sin[:, :half]
            self._cos, self._sin = emb.cos(), sin
        return self._cos, self._sin

    def _check_room(self, end: int) -> None:
        if end > self.shape.context:
            raise ValueError(f"{end} positions exceed the model's context of {self.shape.context}")

    @torch.inference_mode()
    def prefill(self, tokens: Sequence[int], kv: SequenceKV, all_logits: bool = False,
                next_logits: bool = True) -> Optional[torch.Tensor]:
        """Feed prompt ``tokens`` after the ``kv.length`` positions already in ``kv``;
        returns the logits of the last token [1, vocab], or of every token fed
        (``all_logits``), or nothing (``next_logits=False``: more of the prompt follows)."""
        start, end = kv.length, kv.length + len(tokens)
        if not tokens:
            raise ValueError("nothing to prefill")
        self._check_room(end)
        kv.reserve(-(-end // PREFILL_BLOCK) * PREFILL_BLOCK)  # the last block attends over all its keys
        logits: List[torch.Tensor] = []
        for base in range(start - start % PREFILL_BLOCK, end, PREFILL_BLOCK):
            lo, hi = max(start, base), min(end, base + PREFILL_BLOCK)
            ids = torch.zeros(PREFILL_BLOCK, dtype=torch.long)  # padding rows: token 0, never stored
            ids[lo - base:hi - base] = torch.as_tensor(tokens[lo - start:hi - start], dtype=torch.long)
            positions = torch.arange(base, base + PREFILL_BLOCK)
            rows = range(lo - base, hi - base)
            out = self._layers(F.embedding(ids, self.embed), positions, [(kv, row) for row in rows],
                               block=(kv, self._block_mask(base)))
            if all_logits:  # the whole block through lm_head too, so its rows round the same in any split
                logits.append(self._logits(out)[lo - base:hi - base])
            last = out[hi - base - 1:hi - base]
        kv.length = kv.prefilled = end
        # The next token always comes from a one-row call: the same with or without all_logits.
        following = self._logits(last) if next_logits else None
        if not all_logits:
            return following
        if following is not None:
            logits[-1][-1:] = following
        return torch.cat(logits) if len(logits) > 1 else logits[0]

    @torch.inference_mode()
    def decode(self, steps: Sequence[Tuple[int, SequenceKV]]) -> torch.Tensor:
        """One generated token for each (token, its sequence); returns logits [len(steps), vocab]."""
        if len(steps) > self.decode_rows:
            return torch.cat([self.decode(steps[i:i + self.decode_rows])
                              for i in range(0, len(steps), self.decode_rows)])
        for _, kv in steps:
            self._check_room(kv.length + 1)
            kv.reserve(kv.length + 1)
        positions = torch.tensor([kv.length for _, kv in steps])
        ids = torch.tensor([token for token, _ in steps], dtype=torch.long)
        out = self._layers(F.embedding(ids, self.embed), positions, [(kv, i) for i, (_, kv) in enumerate(steps)])
        for _, kv in steps:
            kv.length += 1
        return self._logits(out)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        s = self.shape
        return self.lm_head(F.rms_norm(hidden, (s.hidden,), self.final_norm, s.norm_eps))

    def _block_mask(self, base: int) -> torch.Tensor:
        """Which keys each row of the prefill block at ``base`` sees: causal (and the
        sliding window), over the keys [0, base + PREFILL_BLOCK)."""
        query = torch.arange(base, base + PREFILL_BLOCK)[:, None]
        key = torch.arange(base + PREFILL_BLOCK)[None, :]
        allowed = key <= query
        if self.shape.sliding_window:
            allowed &= key > query - self.shape.sliding_window
        return allowed

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, stored: List[Tuple[SequenceKV, int]],
                block: Optional[Tuple[SequenceKV, torch.Tensor]] = None) -> torch.Tensor:
        """Run every layer over the rows of ``x`` (row i at ``positions[i]``); the rows in
        ``stored`` (sequence, row) write their keys and values and get attention, the
        others only fill the call (their outputs are garbage and never read). ``block``:
        a prefill block of one sequence and its mask, attended in one call."""
        s = self.shape
        n = x.shape[0]
        heads, kv_heads, dim = s.heads, s.kv_heads, s.head_dim
        cos_table, sin_table = self._rope(int(positions.max()) + 1)
        cos, sin = cos_table[positions, None, :], sin_table[positions, None, :]
        where = [(kv, row, int(positions[row])) for kv, row in stored]
        # a prefill block's new rows are one run of positions of one sequence: one copy per layer
        run = (stored[0][0], stored[0][1], len(stored)) if len(stored) > 1 and all(
            kv is stored[0][0] and row == stored[0][1] + i for i, (kv, row) in enumerate(stored)) else None
        attn = torch.zeros(n, heads * dim)
        for index, layer in enumerate(self.layers):
            h = F.rms_norm(x, (s.hidden,), layer.input_norm, s.norm_eps)
            if len(layer.qkv) == 1:
                qkv = layer.qkv[0](h).view(n, heads + 2 * kv_heads, dim)
            else:
                qkv = torch.cat([proj(h) for proj in layer.qkv], dim=1).view(n, heads + 2 * kv_heads, dim)
            qk = qkv[:, :heads + kv_heads]
            qk = qk * cos + qk.roll(dim // 2, dims=-1) * sin
            if run is not None:
                kv, row, count = run
                kv.write(index, where[0][2], qk[row:row + count, heads:], qkv[row:row + count, heads + kv_heads:])
            else:
                for kv, row, position in where:
                    kv.write(index, position, qk[row:row + 1, heads:], qkv[row:row + 1, heads + kv_heads:])
            if block is not None:
                self._attend_block(index, qk, block[0], block[1], attn)
            else:
                self._attend(index, qk, where, attn)
            x = x + layer.o(attn)
            h = F.rms_norm(x, (s.hidden,), layer.post_norm, s.norm_eps)
            act = F.silu(layer.gate(h))
            act *= layer.up(h)
            x = x + layer.down(act)
        return x

    def _attend(self, index: int, qk: torch.Tensor, where: List[Tuple[SequenceKV, int, int]],
                attn: torch.Tensor) -> None:
        """Attention of layer ``index`` for each (sequence, row, position) into ``attn[row]``:
        one query position at a time, over exactly the keys it sees, so the same shapes and
        the same arithmetic whatever else is in the call."""
        s = self.shape
        heads, kv_heads, dim = s.heads, s.kv_heads, s.head_dim
        for kv, row, position in where:
            stop = position + 1
            first = max(0, stop - s.sliding_window) if s.sliding_window else 0
            q = qk[row, :heads].view(1, kv_heads, heads // kv_heads, dim)
            out = F.scaled_dot_product_attention(q, kv.keys(index, first, stop)[None],
                                                 kv.values(index, first, stop)[None])
            attn[row] = out.view(-1)

    def _attend_block(self, index: int, qk: torch.Tensor, kv: SequenceKV, mask: torch.Tensor,
                      attn: torch.Tensor) -> None:
        """Attention of a whole prefill block in one call. A row's result depends only on
        its query, the keys up to it (masked beyond) and the call's shape, which the block
        alignment fixes: the same in any split of the prompt. Keys not written yet are
        zeros (``SequenceKV`` allocates zeroed), so masked positions add exact zeros."""
        s = self.shape
        n, keys = mask.shape
        q = qk[:, :s.heads].transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(q, kv.keys(index, 0, keys)[None], kv.values(index, 0, keys)[None],
                                             attn_mask=mask, enable_gqa=s.heads != s.kv_heads)
        attn.copy_(out[0].transpose(0, 1).reshape(n, s.heads * s.head_dim))
