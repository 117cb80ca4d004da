"""torch.distributed for llamacli: the process group from torchrun's environment, the tensor-parallel shard plan
by Hugging Face tensor name, the rank-local config, and the collectives (with a timeout and a clear error).

The plan (as gpt-fast's tp.py and mlx-lm's `shard_linear`): q/k/v and gate/up are split by output rows (whole
heads), o and down by input columns, so each layer needs one all-reduce after o and one after down. KV heads
are split across ranks with their query heads (whole GQA groups; when the ranks do not divide them the first
ranks take one more, so SmolLM2's 3 KV heads go 2 + 1 over 2 ranks), or, with fewer KV heads than ranks, each
rank holds the one KV head its query heads use (replicated on world / n_kv_heads ranks). The embedding table and lm_head are split by vocabulary: on SmolLM2
the tied table is 21% of the weights, so replicating it would leave each of 2 ranks 61% of the model; split,
the lookup costs one all-reduce of (tokens, dim) and the head one all-gather of the logits. Quantized weights
follow the same plan (`stored_slice`: a quantized checkpoint's tensors in their own units; `check_groups`: int4
groups must not straddle two ranks).
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from llamacli.config import LlamaConfig
from llamacli.errors import LlamaCliError, UsageError

TIMEOUT_ENV = "LLAMACLI_DIST_TIMEOUT"  # seconds a collective waits for the other ranks
DEFAULT_TIMEOUT_S = 300.0


class DistributedError(LlamaCliError):
    """A collective with the other ranks failed: a rank died, or did not answer within the timeout."""


def world_size() -> int:
    """Processes in the job: torchrun's WORLD_SIZE (1 outside torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank: torchrun's RANK (0 outside torchrun)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_s() -> float:
    """The collective timeout: $LLAMACLI_DIST_TIMEOUT seconds, default 300."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"${TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise UsageError(f"${TIMEOUT_ENV} must be positive, got {raw!r}")
    return value


def init(device: torch.device | None = None) -> None:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA) once, with the collective timeout."""
    if dist.is_initialized() or not launched():
        return
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"rank {os.environ.get('RANK', '?')}: cannot join the process group "
                               f"({_first_line(exc)})") from None


def shutdown() -> None:
    """Leave the process group (when this process joined one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _collective(what: str, fn, *args) -> None:
    try:
        fn(*args)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise DistributedError(f"rank {rank()}: {what} with the other ranks failed (a rank died or did not answer "
                               f"within {timeout_s():g} s, ${TIMEOUT_ENV}): {_first_line(exc)}") from None


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum x over the ranks (`op` "max": the elementwise maximum), in place; returns x."""
    if world_size() > 1:
        _collective("an all-reduce", dist.all_reduce, x, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x (..., n) concatenated along the last dimension, rank order: (..., world * n)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    _collective("an all-gather", dist.all_gather, parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def barrier() -> None:
    """Wait for every rank (DistributedError when one died or timed out)."""
    if world_size() > 1:
        _collective("a barrier", dist.barrier)


def wait_all() -> None:
    """Wait for every rank however long they take (a batch's shares end at different times), but fail at once
    when one is gone: gloo's monitored barrier names it; other backends use a plain barrier."""
    if world_size() == 1:
        return
    if dist.get_backend() == "gloo":
        _collective("waiting for the other ranks",
                    lambda: dist.monitored_barrier(timeout=datetime.timedelta(days=30), wait_all_ranks=True))
    else:
        barrier()


def broadcast_object(obj):
    """Rank 0's obj on every rank (any picklable value)."""
    if world_size() == 1:
        return obj
    box = [obj]
    _collective("a broadcast", dist.broadcast_object_list, box, 0)
    return box[0]


# -- the shard plan ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """Which slice of each checkpoint tensor rank `rank` of `world` holds, and the config its runtime runs."""

    config: LlamaConfig  # the checkpoint's
    rank: int
    world: int

    @classmethod
    def for_config(cls, config: LlamaConfig, rank: int, world: int) -> "ShardPlan":
        """The plan for one rank; UsageError (before anything is loaded) when the shape cannot be split."""
        c, w = config, world
        problems = []
        if c.n_kv_heads < w:  # each KV head replicated on w / n_kv_heads ranks, the query heads split evenly
            if w % c.n_kv_heads:
                problems.append(f"n_kv_heads {c.n_kv_heads} (fewer than the ranks, and {w} is not a multiple)")
            if c.n_heads % w:
                problems.append(f"n_heads {c.n_heads}")
        if c.ffn_dim % w:
            problems.append(f"intermediate_size {c.ffn_dim}")
        if c.vocab_size < w:
            problems.append(f"vocab_size {c.vocab_size} (fewer rows than ranks)")
        if problems:
            raise UsageError(f"--tensor-parallel over {w} ranks: the model's {', '.join(problems)} cannot be "
                             f"split in whole heads over {w} ranks (not divisible by {w}); run on a world size "
                             "that divides it")
        return cls(config, rank, world)

    @property
    def kv_heads(self) -> int:
        """KV heads on this rank: a contiguous share (the first ranks one more when they do not divide), or the
        one KV head its query heads use when there are fewer KV heads than ranks."""
        base, extra = divmod(self.config.n_kv_heads, self.world)
        return max(1, base + (self.rank < extra))

    @property
    def kv_first(self) -> int:
        """The first KV head this rank holds."""
        c = self.config
        if c.n_kv_heads >= self.world:
            base, extra = divmod(c.n_kv_heads, self.world)
            return self.rank * base + min(self.rank, extra)
        return self.rank * (c.n_heads // self.world) // c.n_rep  # the KV head its query heads share

    @property
    def heads(self) -> int:
        """Query heads on this rank (whole GQA groups of its KV heads)."""
        if self.config.n_kv_heads >= self.world:
            return self.kv_heads * self.config.n_rep
        return self.config.n_heads // self.world

    @property
    def head_first(self) -> int:
        """The first query head this rank holds."""
        if self.config.n_kv_heads >= self.world:
            return self.kv_first * self.config.n_rep
        return self.rank * self.heads

    @property
    def vocab_chunk(self) -> int:
        """Vocabulary rows per rank (the last rank's share may be shorter)."""
        return -(-self.config.vocab_size // self.world)

    @property
    def vocab_range(self) -> tuple[int, int]:
        """[start, stop) of the vocabulary rows this rank holds."""
        start = min(self.rank * self.vocab_chunk, self.config.vocab_size)
        return start, min(start + self.vocab_chunk, self.config.vocab_size)

    def local_config(self) -> LlamaConfig:
        """The config of this rank's runtime: its heads and MLP width (vocab_size stays the whole: logits are
        gathered), so its KV cache holds its own heads only."""
        return replace(self.config, n_heads=self.heads, n_kv_heads=self.kv_heads,
                       ffn_dim=self.config.ffn_dim // self.world)

    def slice_of(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of tensor `name` this rank reads, or None when every rank reads it whole."""
        c, hd = self.config, self.config.head_dim
        part = name.rsplit(".", 2)[-2:]  # e.g. ["q_proj", "weight"]
        module, kind = part[0], part[-1]
        q = (self.head_first * hd, (self.head_first + self.heads) * hd)
        if module == "q_proj":
            return (0, *q)
        if module in ("k_proj", "v_proj"):
            return 0, self.kv_first * hd, (self.kv_first + self.kv_heads) * hd
        if module in ("gate_proj", "up_proj"):
            f = c.ffn_dim // self.world
            return 0, self.rank * f, (self.rank + 1) * f
        if module == "o_proj" and kind == "weight":
            return (1, *q)
        if module == "down_proj" and kind == "weight":
            f = c.ffn_dim // self.world
            return 1, self.rank * f, (self.rank + 1) * f
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return (0, *self.vocab_range)
        return None  # norms; the o / down biases (added once after the sum: see `bias_once`)

    def bias_once(self, name: str) -> bool:
        """Whether `name` is a row-parallel bias that only rank 0 adds (the all-reduce would add it world times)."""
        return name.endswith(("o_proj.bias", "down_proj.bias"))

    def row_parallel(self, name: str) -> bool:
        """Whether matrix `name` is split by its input columns (o and down: their products are summed)."""
        where = self.slice_of(name)
        return where is not None and where[0] == 1

    def check_groups(self, group: int) -> None:
        """UsageError unless int4 groups of `group` columns tile every rank's input columns of o and down (a
        group must not straddle two ranks), with the numbers and the group sizes that would."""
        from llamacli.quantization import QUANT_GROUP_SIZES

        plans = [replace(self, rank=r) for r in range(self.world)]
        widths = {"o_proj": sorted({p.heads * self.config.head_dim for p in plans}),
                  "down_proj": [self.config.ffn_dim // self.world]}
        bad = [f"{m}'s {'/'.join(map(str, w))} input columns per rank" for m, w in widths.items()
               if any(n % group for n in w)]
        if bad:
            fits = [g for g in QUANT_GROUP_SIZES if all(n % g == 0 for w in widths.values() for n in w)]
            hint = f"--group-size {' or '.join(map(str, fits))}" if fits else "another number of ranks"
            raise UsageError(f"--tensor-parallel over {self.world} ranks with int4 group size {group}: "
                             f"{' and '.join(bad)} are not a multiple of {group}; use {hint}")

    def stored_slice(self, name: str, bits: int, group: int | None) -> tuple[int, int, int] | None:
        """`slice_of` for a quantized checkpoint's tensor `name` (`X.weight`, `X.scales`, `X.biases` of a matrix
        `X`), in its own units: rows as the float matrix's; columns halved for int4's packed weight, in groups
        for its scales and biases, and int8's per-row scales whole (a row's scale is every column's)."""
        prefix, kind = name.rsplit(".", 1)
        where = self.slice_of(f"{prefix}.weight")
        if where is None or where[0] == 0:
            return where
        if bits == 8:
            return where if kind == "weight" else None
        div = 2 if kind == "weight" else group
        return 1, where[1] // div, where[2] // div

    def read(self, info, dtype: torch.dtype, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """This rank's part of a checkpoint tensor (a `layout.TensorInfo` stored in `dtype`; `rows`: only those
        rows of the part), as `slice_of` says; a row-parallel bias is zeros on ranks other than 0."""
        where = self.slice_of(info.name)
        tensor = self.read_slice(info, dtype, where, rows)
        if where is None and self.rank != 0 and self.bias_once(info.name):
            tensor = torch.zeros_like(tensor)
        return tensor

    @staticmethod
    def read_slice(info, dtype: torch.dtype, where: tuple[int, int, int] | None,
                   rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The slice (dim, start, stop) of a tensor (None: whole), rows [a, b) of it with `rows`, read with
        pread: only its rows' bytes for a row slice, so that no page of the file stays mapped into the process."""
        n_rows, per_row = info.shape[0], math.prod(info.shape[1:])
        size = torch.empty((), dtype=dtype).element_size()
        dim, start, stop = where if where is not None else (0, 0, n_rows)
        first, last = (start, stop) if dim == 0 else (0, n_rows)
        if rows is not None:
            first, last = first + rows[0], min(last, first + rows[1])
        with open(info.file, "rb") as f:
            data = bytearray(os.pread(f.fileno(), (last - first) * per_row * size, info.offset + first * per_row * size))
        tensor = torch.frombuffer(data, dtype=dtype).view(last - first, *info.shape[1:])
        return tensor[:, start:stop].contiguous() if dim == 1 else tensor


class VocabShardedEmbedding:
    """The lookup of a table split by vocabulary: each rank looks up its own `n_rows` rows (with `lookup`, ids,
    dtype -> rows: a float table's or a quantized one's), zeros elsewhere, summed over the ranks."""

    def __init__(self, lookup, n_rows: int, start: int):
        self.lookup, self.n_rows, self.start = lookup, n_rows, start

    def __call__(self, tokens: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """tokens (N,) -> (N, dim), the same on every rank (`dtype`: the Runtime's lookup signature)."""
        local = tokens - self.start
        mine = (local >= 0) & (local < self.n_rows)
        x = self.lookup(local.clamp(0, self.n_rows - 1), dtype)
        x = x * mine.unsqueeze(-1).to(x.dtype)  # (N, dim)
        return all_reduce(x)


def comm_bytes_per_token(config: LlamaConfig, world: int, dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Bytes each rank contributes to collectives per decoded token: per layer (two all-reduces of dim), the
    embedding lookup (one of dim), the lm_head (its vocabulary share, gathered), and their total."""
    size = torch.empty((), dtype=dtype).element_size()
    per_layer, embedding = 2 * config.dim * size, config.dim * size
    lm_head = -(-config.vocab_size // world) * size
    return {"per_layer": per_layer, "embedding": embedding, "lm_head": lm_head,
            "total": config.n_layers * per_layer + embedding + lm_head}
