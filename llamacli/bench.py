"""Measure prefill and decode speed, peak memory and achieved memory bandwidth (the logic behind `llamacli bench`).

Like llama-bench: random prompt tokens of each length are prefilled, then `gen_tokens` greedy steps are
decoded through the KV cache, the way the engine drives the model. Every configuration is run once to warm
up (kernel selection, allocator), then `repetitions` times; speeds are reported as median, standard
deviation, min and max. Decoding one token reads every weight once (and the filled KV cache), so
bytes-read-per-step x steps/s is the bandwidth decode achieves; it is set next to a bandwidth measured on
the spot on a large tensor, the practical ceiling.
"""

from __future__ import annotations

import gc
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from llamacli import layout
from llamacli.errors import UsageError
from llamacli.kv_cache import KVCache
from llamacli.model import Llama, Runtime
from llamacli.model.cpu import pack_for_rows


@dataclass
class Spread:
    """Summary of repeated measurements."""

    median: float
    stdev: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        """Median, standard deviation (0 for one value), min and max of values."""
        return cls(statistics.median(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                   min(values), max(values))


@dataclass
class BenchRow:
    """One configuration's results (speeds in tokens/s; a batch counts every row's tokens)."""

    dtype: str
    device: str
    batch_size: int
    prompt_tokens: int
    gen_tokens: int
    prefill_tokens_per_s: Spread
    decode_tokens_per_s: Spread
    decode_bytes_per_step: int
    decode_gb_per_s: float  # bytes read per decode step x median steps/s
    bandwidth_pct: float  # decode_gb_per_s as a percentage of the measured bandwidth
    peak_memory_mb: float  # peak resident memory of the process so far (CPU) / peak allocated (CUDA)
    repetitions: int


@dataclass
class BenchReport:
    """All rows of a bench run, with the machine facts they depend on."""

    model: str
    threads: int
    memory_bandwidth_gb_per_s: float
    bandwidth_method: str
    torch_version: str
    rows: list[BenchRow] = field(default_factory=list)

    def as_dict(self) -> dict:
        """Plain JSON-ready numbers."""
        return asdict(self)


def parse_int_list(text: str, what: str) -> list[int]:
    """'128,512' -> [128, 512]; every value an integer >= 1."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{what} must be integers >= 1, got '{text}'")
    return values


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` in milliseconds over `repeats` calls, after `warmup` untimed ones (CPU work:
    no device sync)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure_bandwidth(device: torch.device | str = "cpu", mib: int = 256, repeats: int = 5) -> tuple[float, str]:
    """Memory bandwidth in GB/s measured now: the best of reading (sum) and copying a large fp32 tensor.

    A copy counts the bytes read and written. The best run is reported: it is the ceiling decode can
    approach, and other processes on the machine only ever make a run slower.
    """
    device = torch.device(device)
    n = mib * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = 0.0
    for op, nbytes in ((lambda: src.sum(), src.nbytes), (lambda: dst.copy_(src), 2 * src.nbytes)):
        op()
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            op()
            _sync(device)
            best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    del src, dst
    return best, f"best of sum and copy over {mib} MiB fp32, {repeats} runs each"


def weight_bytes_per_step(model: Llama | Runtime) -> int:
    """Bytes of weights one decode step reads (see the model's `weight_bytes_per_step`)."""
    return model.weight_bytes_per_step()


def kv_bytes_per_step(model: Llama, context: float, batch_size: int, dtype: torch.dtype) -> int:
    """Bytes of KV cache a decode step reads at a given filled length (keys and values, all layers, all rows)."""
    return int(layout.kv_bytes_per_token(model.config, str(dtype)) * context * batch_size)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated on a CUDA device, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


@torch.inference_mode()
def time_generation(model: Llama, prompt: torch.Tensor, gen_tokens: int) -> tuple[float, float]:
    """Prefill prompt (B, P) into a fresh cache, then decode gen_tokens greedy steps; return (prefill_s, decode_s)."""
    B, P = prompt.shape
    device = prompt.device
    cache = KVCache(model.config, B, P + gen_tokens, dtype=model.dtype, device=device)
    _sync(device)
    t0 = time.perf_counter()
    logits = model(prompt, 0, cache, last_only=True)
    token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    _sync(device)
    t1 = time.perf_counter()
    for pos in range(P, P + gen_tokens):
        logits = model(token, pos, cache, last_only=True)
        token = logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


def bench_model(model: Llama, prompt_tokens: list[int], gen_tokens: int, batch_sizes: list[int],
                repetitions: int = 5, bandwidth_gb_per_s: float = 0.0, seed: int = 0) -> list[BenchRow]:
    """Prefill and decode speeds of a loaded model for every (batch size, prompt length)."""
    if repetitions < 1:
        raise UsageError(f"repetitions must be >= 1, got {repetitions}")
    cfg = model.config
    device, dtype = model.device, model.dtype
    for p in prompt_tokens:
        if p + gen_tokens > cfg.context_length:
            raise UsageError(f"prompt ({p} tokens) + gen-tokens ({gen_tokens}) = {p + gen_tokens} exceeds the "
                             f"model's context of {cfg.context_length} tokens")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for batch in batch_sizes:
        for p in prompt_tokens:
            prompt = torch.randint(0, cfg.vocab_size, (batch, p), generator=generator).to(device)
            time_generation(model, prompt, min(gen_tokens, 8))  # warm-up
            prefill, decode = [], []
            for _ in range(repetitions):
                pre_s, dec_s = time_generation(model, prompt, gen_tokens)
                prefill.append(batch * p / pre_s)
                decode.append(batch * gen_tokens / dec_s)
            dec = Spread.of(decode)
            step_bytes = weight_bytes_per_step(model) + kv_bytes_per_step(model, p + gen_tokens / 2, batch, dtype)
            gbps = step_bytes * dec.median / batch / 1e9
            rows.append(BenchRow(
                dtype=str(dtype).removeprefix("torch."), device=str(device), batch_size=batch, prompt_tokens=p,
                gen_tokens=gen_tokens, prefill_tokens_per_s=Spread.of(prefill), decode_tokens_per_s=dec,
                decode_bytes_per_step=step_bytes, decode_gb_per_s=gbps,
                bandwidth_pct=100 * gbps / bandwidth_gb_per_s if bandwidth_gb_per_s > 0 else 0.0,
                peak_memory_mb=peak_memory_mb(device), repetitions=repetitions,
            ))
            gc.collect()
    return rows


def run_bench(folder, prompt_tokens: list[int], gen_tokens: int, batch_sizes: list[int], dtypes: list[str],
              device: str = "auto", repetitions: int = 5, threads: int | None = None,
              model_name: str | None = None, quantize: list[str | None] | None = None,
              group_size: int | None = None, shard=None) -> BenchReport:
    """Load the checkpoint once per dtype and quantization (None: as stored) and weight layout, and bench it,
    then measure the memory bandwidth; a quantized row's dtype reads 'float32+int8' (activations + weights).
    Batch sizes are measured on the layout `generate` loads for them (`weights.load_model`'s `decode_rows`: one
    row on one thread unpacked fp32, else packed), so batch 1 is what `generate` decodes at.

    `shard` (a `parallel.ShardPlan`): bench this tensor-parallel rank's shard (run by every rank at once)."""
    from llamacli.weights import load_model, resolve_device

    if gen_tokens < 1:
        raise UsageError(f"gen-tokens must be >= 1, got {gen_tokens}")
    if threads is not None:
        if threads < 1:
            raise UsageError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    rows = []
    layouts: dict[bool, list[int]] = {}  # batch sizes by the layout they load: several rows packed or not
    for b in batch_sizes:
        layouts.setdefault(pack_for_rows(torch.float32, b), []).append(b)
    for dtype, quant in [(d, q) for d in dtypes for q in (quantize or [None])]:
        new_rows = []
        float32 = quant is None and dtype not in ("bfloat16", "float16")  # the layout differs for fp32 only
        for sizes in layouts.values() if float32 else [batch_sizes]:
            model = load_model(folder, dtype=dtype, device=str(dev), quantize=quant, decode_rows=sizes[0],
                               group_size=group_size if quant == "int4" else None, shard=shard)
            new_rows += bench_model(model, prompt_tokens, gen_tokens, sizes, repetitions)
            del model
            gc.collect()
        new_rows.sort(key=lambda row: batch_sizes.index(row.batch_size))  # stable: prompt lengths keep their order
        if quant is not None:
            for row in new_rows:
                row.dtype += f"+{quant}" + (f"g{group_size or 32}" if quant == "int4" else "")
        rows += new_rows
    # Measured last, so that its large buffers do not count in the peak memory reported for the model.
    bandwidth, method = measure_bandwidth(dev)
    for row in rows:
        row.bandwidth_pct = 100 * row.decode_gb_per_s / bandwidth if bandwidth > 0 else 0.0
    return BenchReport(model=model_name or str(folder), threads=torch.get_num_threads(),
                       memory_bandwidth_gb_per_s=bandwidth, bandwidth_method=method,
                       torch_version=torch.__version__, rows=rows)
