"""Load safetensors weights (single file or sharded) strictly onto `model.Llama`.

Every checkpoint tensor must be used and every model parameter found with the right shape: `llamacli.layout`
checks the file headers against the config before any module is built or tensor read, so a config that
claims more layers than the files hold fails at once. The model is then built on the meta device and
parameters are assigned as they are read, in the requested dtype and device, so it is never allocated twice.

With a tensor-parallel `shard` plan (llamacli.parallel), the headers are still checked against the whole
config, the reference model is built with the rank's config, and only the rank's slices are read from the
files (pread of its rows, no memory map); its runtime then all-reduces after o and down and gathers the lm_head's logits.
Quantized weights shard the same way: a float checkpoint's slices are quantized per rank as they are read (int8
rows of o / down take the whole row's max |w|, one all-reduce, so every rank's int8 matrix is its columns of the
one-process int8 matrix), and a quantized checkpoint's tensors are sliced as stored (rows, or columns / groups).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llamacli import layout, parallel, quantization
from llamacli.config import LlamaConfig, load_config
from llamacli.errors import UsageError, WeightsError
from llamacli.model import Llama, Runtime
from llamacli.model.cpu import pack_for_rows, will_pack
from llamacli.model.linear import AllReduced, Gathered
from llamacli.parallel import ShardPlan, VocabShardedEmbedding

# The dtypes a model runs in, from the one dtype table (torch spells them the same way).
DTYPES = {name: getattr(torch, name) for name in layout.RUN_DTYPES}


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device must be available."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UsageError(f"unknown device '{device}' (choose auto, cpu, cuda or mps)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("device 'cuda' was requested but no CUDA GPU is available")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("device 'mps' was requested but MPS is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, config: LlamaConfig | None = None) -> torch.dtype:
    """'auto' is float32 on CPU and the checkpoint's dtype elsewhere; otherwise the named dtype."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        stored = (config.torch_dtype if config else None) or "float32"
        return DTYPES.get(stored, torch.float32)
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}' (choose auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None


QUANTIZE_BITS = {"int8": 8, "int4": 4}
BLOCK_ROWS = 4096  # rows of a float matrix read and quantized at a time when quantizing at load


def load_model(folder: str | Path, dtype: str = "auto", device: str = "auto", config: LlamaConfig | None = None,
               runtime: bool = True, pack: bool = True, quantize: str | None = None,
               group_size: int | None = None, shard: ShardPlan | None = None,
               decode_rows: int | None = None) -> Runtime | Llama:
    """Load a checkpoint folder strictly (names and shapes) in the chosen dtype and device.

    Returns the `Runtime` built from it (the default: fused q/k/v and gate/up, the reference weights released
    as they are laid out), or with `runtime=False` the reference `Llama` itself. `pack` lets the runtime
    prepack CPU weights for oneDNN (fp32, and bf16 where the CPU has native bf16): about twice as fast.
    `decode_rows`, the rows a decode step will multiply (1 for one stream, the batch size for a batch), picks the
    layout that is fastest for them (`model.cpu.pack_for_rows`: fp32 one-row steps on one thread are faster
    unpacked); None packs wherever `pack` allows (prefill-heavy work, perplexity).
    `quantize` ('int8' | 'int4', with `group_size` for int4, default 32) quantizes the matrices layer by layer
    as they are read; a quantized checkpoint loads in its own quantization with no flag. `dtype` is then the
    activations' (and norms') dtype. `shard` (a `parallel.ShardPlan`): read and run only this rank's slices
    (needs the runtime; int4 needs groups that tile each rank's o / down columns: `ShardPlan.check_groups`).
    """
    folder = Path(folder)
    config = config or load_config(folder)
    quant = load_quantization(folder, quantize, group_size)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev, config)
    pack = pack and (decode_rows is None or pack_for_rows(torch_dtype, decode_rows))
    # Headers against the config first: a config claiming 10**6 layers must not build 10**6 modules.
    stored = quantization.read_quantization(folder)
    used = layout.check_tensors(config, layout.read_tensors(folder), folder, stored)
    if shard is not None and not runtime:
        raise ValueError("a tensor-parallel shard runs on the runtime only (runtime=True)")
    if quant is not None:
        if not runtime:
            raise UsageError("a quantized model runs in the runtime only (runtime=False needs float weights)")
        if shard is not None and quant.bits == 4:
            shard.check_groups(quant.group_size)
        return load_quantized(config, used, quant, stored is not None, dev, torch_dtype, shard)
    need, available = used, {name: t.file for name, t in used.items()}
    handles = {path: _open(path) for path in set(available.values())} if shard is None else {}
    use_embed_for_head = "lm_head.weight" not in used
    with torch.device("meta"):
        model = Llama(shard.local_config() if shard is not None else config)

    params = dict(model.named_parameters(remove_duplicate=True))
    # A tensor read in its stored dtype is a view of the memory-mapped file, and the mapping lives as long
    # as any such tensor. When the weights are going to be packed (and the plain ones released), copy them
    # instead, so that the file's pages leave the process with the loader.
    copy = shard is None and runtime and pack and dev.type == "cpu" and will_pack(torch_dtype)
    for name in need:
        try:
            if shard is not None:
                tensor = shard.read(used[name], getattr(torch, layout.SAFETENSORS_DTYPES[used[name].dtype].name))
            else:
                tensor = handles[available[name]].get_tensor(name)
        except (SafetensorError, OSError, Exception) as exc:
            raise WeightsError(f"{available[name]}: tensor '{name}' is truncated or corrupt ({exc})") from None
        _assign(model, name, torch.nn.Parameter(tensor.to(device=dev, dtype=torch_dtype, copy=copy),
                                                requires_grad=False))
        del params[name]
    if use_embed_for_head:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    if not runtime:
        return model
    built = Runtime.build(model, pack=pack, release=True)
    return built if shard is None else _sharded(built, shard)


def _sharded(rt: Runtime, shard: ShardPlan) -> Runtime:
    """A rank's runtime: sums after o and down, the vocabulary-split lookup and the gathered lm_head."""
    for L in rt.layers:
        L.o, L.down = AllReduced(L.o), AllReduced(L.down)
    rt.lm_head = Gathered(rt.lm_head, shard.vocab_chunk, shard.config.vocab_size)
    start, stop = shard.vocab_range
    rt.lookup = VocabShardedEmbedding(rt.lookup, stop - start, start)
    return rt


def check_quantize(quantize: str | None, group_size: int | None) -> quantization.Quantization | None:
    """The quantization --quantize / --group-size ask for (None: none); UsageError for a bad value or mix."""
    if quantize is None:
        if group_size is not None:
            raise UsageError("--group-size applies to --quantize int4 only")
        return None
    if quantize not in QUANTIZE_BITS:
        raise UsageError(f"unknown quantization '{quantize}' (choose {', '.join(QUANTIZE_BITS)})")
    bits = QUANTIZE_BITS[quantize]
    if bits == 8:
        if group_size is not None:
            raise UsageError("--group-size applies to --quantize int4 only (int8 is per row)")
        return quantization.Quantization(8)
    group = 32 if group_size is None else group_size
    if group not in quantization.QUANT_GROUP_SIZES:
        raise UsageError(f"--group-size {group} is not supported (choose "
                         f"{', '.join(map(str, quantization.QUANT_GROUP_SIZES))})")
    return quantization.Quantization(4, group)


def load_quantization(folder: str | Path, quantize: str | None,
                      group_size: int | None) -> quantization.Quantization | None:
    """The quantization a load ends up in (None: float weights): the checkpoint's own, or --quantize's
    (UsageError for a bad value or mix: --quantize on a quantized checkpoint). Reads config.json only."""
    asked, stored = check_quantize(quantize, group_size), quantization.read_quantization(folder)
    if asked is not None and stored is not None:
        raise UsageError(f"{folder} is already quantized ({stored.describe()}); load it without --quantize")
    return asked or stored


class _Reader:
    """Reads checkpoint tensors by name, opening each file on demand; `release()` closes them all, so the
    memory-mapped pages touched so far leave the process (loading layer by layer stays bounded)."""

    def __init__(self, used: dict[str, layout.TensorInfo]):
        self.used, self.handles = used, {}

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` as stored (a vector, or a quantized checkpoint's tensor: `quantized` is `get`)."""
        path = self.used[name].file
        if path not in self.handles:
            self.handles[path] = _open(path)
        try:
            return self.handles[path].get_tensor(name)
        except (SafetensorError, Exception) as exc:
            raise WeightsError(f"{path}: tensor '{name}' is truncated or corrupt ({exc})") from None

    quantized = get

    def n_rows(self, name: str) -> int:
        """Rows of the matrix `name` this process holds."""
        return self.used[name].shape[0]

    def row_max(self, name: str, block: torch.Tensor) -> torch.Tensor | None:
        """The max |w| of the whole rows of a block when it holds only some of their columns (here: never)."""
        return None

    def rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of the matrix `name` (a copy), its file closed again after."""
        path = self.used[name].file
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return f.get_slice(name)[start:end].clone()
        except (SafetensorError, Exception) as exc:
            raise WeightsError(f"{path}: tensor '{name}' is truncated or corrupt ({exc})") from None

    def release(self) -> None:
        """Close every open file, and hand freed heap back to the system (glibc keeps it otherwise)."""
        self.handles.clear()
        _malloc_trim()


class _ShardReader:
    """A tensor-parallel rank's `_Reader`: its slices of each tensor (`ShardPlan`), read with pread."""

    def __init__(self, used: dict[str, layout.TensorInfo], shard: ShardPlan, quant: quantization.Quantization):
        self.used, self.shard, self.quant = used, shard, quant

    def _read(self, name: str, read) -> torch.Tensor:
        info = self.used[name]
        try:
            return read(info, getattr(torch, layout.SAFETENSORS_DTYPES[info.dtype].name))
        except (OSError, RuntimeError, ValueError) as exc:
            raise WeightsError(f"{info.file}: tensor '{name}' is truncated or corrupt ({exc})") from None

    def get(self, name: str) -> torch.Tensor:
        """This rank's part of a vector (norms whole; a row-parallel bias on rank 0 only)."""
        return self._read(name, self.shard.read)

    def quantized(self, name: str) -> torch.Tensor:
        """This rank's part of a quantized checkpoint's tensor (weight, scales or biases of a matrix)."""
        bits = quantization.matrix_bits(name.rsplit(".", 1)[0] + ".weight", self.quant)
        where = self.shard.stored_slice(name, bits, self.quant.group_size)
        return self._read(name, lambda info, dtype: self.shard.read_slice(info, dtype, where))

    def n_rows(self, name: str) -> int:
        """Rows of the float matrix `name` this rank holds."""
        where = self.shard.slice_of(name)
        return where[2] - where[1] if where is not None and where[0] == 0 else self.used[name].shape[0]

    def row_max(self, name: str, block: torch.Tensor) -> torch.Tensor | None:
        """For a row-parallel matrix (o, down): the max |w| of each whole row of the block, over the ranks."""
        if not self.shard.row_parallel(name):
            return None
        return parallel.all_reduce(block.abs().amax(dim=1).float().contiguous(), "max")

    def rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of this rank's part of the float matrix `name`."""
        return self._read(name, lambda info, dtype: self.shard.read(info, dtype, rows=(start, end)))

    def release(self) -> None:
        """Hand freed heap back to the system (no file stays open)."""
        _malloc_trim()


def _malloc_trim() -> None:
    """glibc's malloc_trim(0) where there is one: the float temporaries of a quantized layer leave the process."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@torch.no_grad()
def load_quantized(config: LlamaConfig, used: dict[str, layout.TensorInfo], quant: quantization.Quantization,
                   stored: bool, dev: torch.device, dtype: torch.dtype, shard: ShardPlan | None = None) -> Runtime:
    """Build a Runtime with quantized matrices, one layer at a time: from a quantized checkpoint's tensors
    (`stored`) or by quantizing a float checkpoint's; memory peaks at the quantized model plus one float layer.
    With `shard`, this rank's slices only (shard, then quantize), in a runtime that sums and gathers over ranks."""
    from llamacli.model.runtime import RuntimeLayer
    from llamacli.quant import QuantizedTensor, build_quantized, quantize_matrix
    from llamacli.quant.quantize import concat, dequantize_rows

    reader = _Reader(used) if shard is None else _ShardReader(used, shard, quant)

    def quantized_blocks(name: str, bits: int, group: int | None):
        rows = reader.n_rows(name)
        for r in range(0, rows, BLOCK_ROWS):
            block = reader.rows(name, r, min(r + BLOCK_ROWS, rows))
            yield quantize_matrix(block, bits, group, name, reader.row_max(name, block) if bits == 8 else None)

    def matrix(name: str) -> QuantizedTensor:
        bits, prefix = quantization.matrix_bits(name, quant), name.removesuffix(".weight")
        group = quant.group_size if bits == 4 else None
        if stored:
            t = QuantizedTensor(bits, reader.quantized(name), reader.quantized(f"{prefix}.scales"),
                                reader.quantized(f"{prefix}.biases") if bits == 4 else None, group)
        else:  # in blocks of rows, each read with its file closed after: a big table never sits in memory
            t = concat(list(quantized_blocks(name, bits, group)))
            _malloc_trim()
        return QuantizedTensor(*(p if p is None or not isinstance(p, torch.Tensor) else p.to(dev, copy=True)
                                 for p in t))

    def vector(name: str) -> torch.Tensor:
        return reader.get(name).to(device=dev, dtype=dtype, copy=True)

    def linear(prefix: str, parts: list[str], bias: bool):
        names = [f"{prefix}.{p}" for p in parts]
        return build_quantized([matrix(f"{n}.weight") for n in names],
                               [vector(f"{n}.bias") for n in names] if bias else None)

    layers = []
    for i in range(config.n_layers):
        p = f"model.layers.{i}"
        a, m = f"{p}.self_attn", f"{p}.mlp"
        layers.append(RuntimeLayer(
            vector(f"{p}.input_layernorm.weight"),
            linear(a, ["q_proj", "k_proj", "v_proj"], config.attention_bias),
            linear(a, ["o_proj"], config.attention_bias),
            vector(f"{p}.post_attention_layernorm.weight"),
            linear(m, ["gate_proj", "up_proj"], config.mlp_bias), linear(m, ["down_proj"], config.mlp_bias)))
        reader.release()
    table = matrix("model.embed_tokens.weight")  # looked up by rows; a tied one is also the lm_head
    head = build_quantized([table if "lm_head.weight" not in used else matrix("lm_head.weight")])
    norm = vector("model.norm.weight")
    reader.release()
    rt = Runtime(config if shard is None else shard.local_config(), layers, norm, None, head,
                 lookup=functools.partial(dequantize_rows, table))
    return rt if shard is None else _sharded(rt, shard)


def _assign(model: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    setattr(owner, attr, param)
