"""Where the 7B prefill time goes: the library's int4 kernel against dequantize + bf16 GEMM on one 11008x4096 sym_int4 layer, and three torch dequantizations (docs/performance.md)."""
import time, torch, warnings
warnings.filterwarnings("ignore")
torch.set_num_threads(2)
K, N = 4096, 11008
import torch.nn as nn
from ipex_llm import optimize_model
from ipex_llm.transformers.low_bit_linear import ggml_convert_fp32
m = nn.Sequential(nn.Linear(K, N, bias=False)); m[0].weight.data = torch.randn(N, K) * 0.02
lin = optimize_model(m, low_bit="sym_int4", optimize_llm=False)[0]
w = lin.weight; raw = w.data; nb = N * K // 64
def t(f, reps=5):
    f(); s = time.perf_counter()
    for _ in range(reps): f()
    return (time.perf_counter() - s) / reps * 1e3
ref = ggml_convert_fp32(raw, (N, K), N * K, w.qtype)
def deq_current():
    b = raw.view(-1, 34); s = b[:, :2].contiguous().view(torch.float16).to(torch.bfloat16)
    q = b[:, 2:]; lo = (q & 0x0F).to(torch.int8) - 8; hi = (q >> 4).to(torch.int8) - 8
    return (torch.cat([lo, hi], 1).to(torch.bfloat16) * s).view(N, K)
# LUT: byte -> (low-8, high-8) as bf16, gathered, then the block's halves placed and scaled
lut = torch.tensor([[(b & 15) - 8, (b >> 4) - 8] for b in range(256)], dtype=torch.bfloat16)  # [256, 2]
def deq_lut():
    b = raw.view(-1, 34); s = b[:, :2].contiguous().view(torch.float16).to(torch.bfloat16)
    v = lut[b[:, 2:].long()]            # [nb, 32, 2]
    v = v.transpose(1, 2)               # [nb, 2, 32]: lows then highs
    return (v.reshape(nb, 64) * s).view(N, K)
def deq_int8_then_scale():
    b = raw.view(-1, 34); s = b[:, :2].contiguous().view(torch.float16).to(torch.bfloat16)
    q = b[:, 2:]
    out = torch.empty(nb, 64, dtype=torch.bfloat16)
    out[:, :32] = (q & 0x0F); out[:, 32:] = (q >> 4)
    out.sub_(8).mul_(s)
    return out.view(N, K)
for name, f in (("current", deq_current), ("lut", deq_lut), ("fill-sub-mul", deq_int8_then_scale)):
    v = f(); print(name, "max err", float((v.float() - ref).abs().max()), "ms", round(t(f), 1), flush=True)
wb = ref.to(torch.bfloat16)
with torch.inference_mode():
    for rows in (64, 256, 512):
        x = torch.randn(rows, K); xb = x.to(torch.bfloat16)
        print(rows, "rows: kernel ms", round(t(lambda: lin(x)), 1), "bf16 GEMM ms", round(t(lambda: torch.nn.functional.linear(xb, wb)), 1), flush=True)
