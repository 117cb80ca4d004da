"""Load safetensors weights (single file or sharded) strictly onto `model.Llama`.

Every checkpoint tensor must be used and every model parameter found with the right shape: `llamacli.layout`
checks the file headers against the config before any module is built or tensor read, so a config that
claims more layers than the files hold fails at once. The model is then built on the meta device and
parameters are assigned as they are read, in the requested dtype and device, so it is never allocated twice.

With a tensor-parallel `shard` plan (llamacli.parallel), the headers are still checked against the whole
config, the reference model is built with the rank's config, and only the rank's slices are read from the
files (pread of its rows, no memory map); its runtime then all-reduces after o and down and gathers the lm_head's logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llamacli import layout
from llamacli.config import LlamaConfig, load_config
from llamacli.errors import UsageError, WeightsError
from llamacli.model import Llama, Runtime
from llamacli.model.cpu import will_pack
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


def load_model(folder: str | Path, dtype: str = "auto", device: str = "auto", config: LlamaConfig | None = None,
               runtime: bool = True, pack: bool = True, shard: ShardPlan | None = None) -> Runtime | Llama:
    """Load a checkpoint folder strictly (names and shapes) in the chosen dtype and device.

    Returns the `Runtime` built from it (the default: fused q/k/v and gate/up, the reference weights released
    as they are laid out), or with `runtime=False` the reference `Llama` itself. `pack` lets the runtime
    prepack CPU weights for oneDNN (fp32, and bf16 where the CPU has native bf16): about twice as fast.
    `shard` (a `parallel.ShardPlan`): read and run only this rank's slices (needs the runtime).
    """
    folder = Path(folder)
    config = config or load_config(folder)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev, config)
    # Headers against the config first: a config claiming 10**6 layers must not build 10**6 modules.
    used = layout.checkpoint_tensors(config, folder)
    if shard is not None and not runtime:
        raise ValueError("a tensor-parallel shard runs on the runtime only (runtime=True)")
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
    rt.lookup = VocabShardedEmbedding(rt.embed, shard.vocab_range[0])
    return rt


def _assign(model: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    setattr(owner, attr, param)
