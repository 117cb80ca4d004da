"""Would `torch.compile` make the one-token step faster? The runtime's eager step against Inductor's compile of it.

    python benchmarks/bench_compile.py [--model DIR] [--dtype float32] [--threads 1,2] [--context 128] [--steps 50]

Decoding one token runs ~25 small operations per layer besides the four matrix products (profile_decode.py's
"rest"). Inductor's CPU path fuses elementwise work into generated C++ loops and, with `freezing`, prepacks the
weights for MKL. This builds the one-token step the way the compiler wants it: one `nn.Module` whose parameters
are the runtime's fused matrices (q/k/v, gate/up), norms and tied table, static shapes (batch 1, a cache of
`context + 32` positions read whole under a mask, the position a tensor so that no step recompiles), and times:

- `runtime`: the runtime's own eager step (what `generate` runs: oneDNN-packed fp32 products, SDPA);
- `module eager`: the module above without compiling (the same operations as the runtime, plain F.linear);
- `compiled`: `torch.compile(module)` with `freezing` (and `cpp_wrapper` with --cpp-wrapper).

It checks that the compiled step's logits agree with the runtime's, and prints the compile time (first call).
Medians of --steps steps after warm-up, one process, alternating; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_batch import checkpoint_folder  # noqa: E402
from llamacli.bench import median_ms  # noqa: E402
from llamacli.kv_cache import KVCache  # noqa: E402
from llamacli.rope import RopeCache  # noqa: E402
from llamacli.weights import load_model  # noqa: E402


class OneTokenStep(nn.Module):
    """The runtime's one-token forward over a static (layers, 1, kv_heads, positions, head_dim) cache."""

    def __init__(self, llama, positions: int):
        super().__init__()
        cfg = self.config = llama.config
        frozen = lambda t: nn.Parameter(t.detach().clone(), requires_grad=False)  # noqa: E731
        self.layers = nn.ModuleList()
        for block in llama.model.layers:
            a, m = block.self_attn, block.mlp
            layer = nn.Module()
            layer.norm1 = frozen(block.input_layernorm.weight)
            layer.norm2 = frozen(block.post_attention_layernorm.weight)
            layer.qkv = frozen(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            layer.o, layer.down = frozen(a.o_proj.weight), frozen(m.down_proj.weight)
            layer.gate_up = frozen(torch.cat([m.gate_proj.weight, m.up_proj.weight]))
            self.layers.append(layer)
        self.embed, self.norm = frozen(llama.model.embed_tokens.weight), frozen(llama.model.norm.weight)
        self.head = self.embed if llama.lm_head.weight is llama.model.embed_tokens.weight else frozen(
            llama.lm_head.weight)
        cos, sin = RopeCache(cfg).tables(0, positions, positions, torch.device("cpu"))  # (1, 1, S, head_dim)
        half = cfg.head_dim // 2
        self.register_buffer("cos", cos[0, 0].clone())
        self.register_buffer("sin", torch.cat((-sin[0, 0, :, :half], sin[0, 0, :, half:]), -1))  # rotate_half's sign

    def forward(self, token: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """token (1,), pos (1,) -> logits (1, vocab); writes the new key/value at pos of every layer's cache."""
        cfg = self.config
        H, KV, hd, eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps
        x = F.embedding(token, self.embed)  # (1, dim)
        cos, sin = self.cos[pos][:, None].to(x.dtype), self.sin[pos][:, None].to(x.dtype)  # (1, 1, head_dim)
        seen = torch.arange(keys.shape[3], device=pos.device)[None, :] <= pos[:, None]
        mask = torch.zeros(seen.shape, dtype=x.dtype).masked_fill(~seen, float("-inf"))[:, None, None]
        for i, L in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), L.norm1, eps)
            qkv = F.linear(h, L.qkv).view(1, H + 2 * KV, hd)
            qk = qkv[:, :H + KV]
            qk = qk * cos + qk.roll(hd // 2, -1) * sin
            k, v = qk[:, H:], qkv[:, H + KV:]
            keys[i].index_copy_(2, pos, k[:, :, None])
            values[i].index_copy_(2, pos, v[:, :, None])
            q = (qk[:, :H] * hd ** -0.5).view(1, KV, H // KV, hd)
            scores = q @ keys[i].transpose(-1, -2) + mask  # (1, kv_heads, group, positions)
            p = torch.softmax(scores.float(), -1).to(x.dtype)
            x = x + F.linear((p @ values[i]).reshape(1, H * hd), L.o)
            h = F.rms_norm(x, (x.shape[-1],), L.norm2, eps)
            gu = F.linear(h, L.gate_up)
            f = gu.shape[-1] // 2
            x = x + F.linear(F.silu(gu[:, :f]) * gu[:, f:], L.down)
        return F.linear(F.rms_norm(x, (x.shape[-1],), self.norm, eps), self.head)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder (default: the SmolLM2 test checkpoint)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cpp-wrapper", action="store_true")
    args = ap.parse_args()
    folder = checkpoint_folder(args.model)
    import torch._inductor.config as inductor

    inductor.freezing = True
    inductor.cpp_wrapper = args.cpp_wrapper
    ctx, S = args.context, args.context + 32
    runtime = load_model(folder, dtype=args.dtype, decode_rows=1)  # the layout generate decodes one stream with
    module = OneTokenStep(load_model(folder, dtype=args.dtype, runtime=False), S).eval()
    cfg = runtime.config
    cache = KVCache(cfg, 1, S, dtype=runtime.dtype)
    shape = (cfg.n_layers, 1, cfg.n_kv_heads, S, cfg.head_dim)
    keys, values = torch.zeros(shape, dtype=runtime.dtype), torch.zeros(shape, dtype=runtime.dtype)
    prompt = torch.randint(0, cfg.vocab_size, (1, ctx))
    with torch.inference_mode():
        runtime(prompt, 0, cache, last_only=True)
        for i in range(cfg.n_layers):  # the same prompt's keys/values in the module's cache
            k, v = cache.row(i, 0)
            keys[i, 0], values[i, 0] = k, v
        compiled = torch.compile(module)
        token, pos = torch.zeros(1, dtype=torch.long), torch.tensor([ctx])
        t0 = time.perf_counter()
        got = compiled(token, pos, keys, values)[0]
        compile_s = time.perf_counter() - t0
        want = runtime(token[None], ctx, cache, last_only=True)[0, -1]
        print(f"{folder.name}, {args.dtype}, torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}; "
              f"compile (first call) {compile_s:.1f} s; logits max |compiled - runtime| "
              f"{(got - want).abs().max().item():.2e} of {want.abs().max().item():.1f}")
        print(f"{'threads':>7} {'runtime ms':>11} {'module eager ms':>16} {'compiled ms':>12} {'compiled/runtime':>17}")
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            run = {"runtime": lambda: runtime(token[None], ctx, cache, last_only=True),
                   "eager": lambda: module(token, pos, keys, values),
                   "compiled": lambda: compiled(token, pos, keys, values)}
            ms = {name: [] for name in run}
            for _ in range(2):  # alternating, twice
                for name, fn in run.items():
                    ms[name].append(median_ms(fn, args.steps, warmup=3))
            best = {name: min(v) for name, v in ms.items()}
            print(f"{threads:>7} {best['runtime']:>11.2f} {best['eager']:>16.2f} {best['compiled']:>12.2f} "
                  f"{best['compiled'] / best['runtime']:>17.2f}", flush=True)


if __name__ == "__main__":
    main()
