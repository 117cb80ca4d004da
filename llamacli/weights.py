"""Load safetensors weights (single file or sharded) strictly onto `model.Llama`.

Every checkpoint tensor must be used and every model parameter found with the right shape, checked from the
file headers before any tensor is read. The model is built on the meta device and parameters are assigned
as they are read, in the requested dtype and device, so the model is never allocated twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llamacli.config import LlamaConfig, load_config
from llamacli.errors import UsageError, WeightsError
from llamacli.model import Llama, Runtime
from llamacli.model.cpu import will_pack

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
PICKLE_PATTERNS = ("*.bin", "*.pth", "*.pt", "*.ckpt")


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


def find_weight_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it; refuse pickle-only checkpoints."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise WeightsError(f"{index}: malformed index ({exc.__class__.__name__}: {exc})") from None
        out = {}
        for name, file in weight_map.items():
            path = folder / file
            if not path.is_file():
                raise WeightsError(f"{index}: shard '{file}' (holding '{name}') is missing")
            out[name] = path
        return out
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for pat in PICKLE_PATTERNS for p in sorted(folder.glob(pat))]
        if pickles:
            raise WeightsError(
                f"{folder}: only pickle weights ({', '.join(pickles[:3])}); pickle files can run code when loaded, "
                "so llamacli reads safetensors only. Convert once with transformers: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise WeightsError(f"{folder}: no *.safetensors weights found")
    out = {}
    for path in files:
        for name in _open(path).keys():
            out[name] = path
    return out


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None


def expected_shapes(model: Llama) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names the model needs, with their shapes (tied lm_head excluded)."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=True)}
    return shapes


def load_model(folder: str | Path, dtype: str = "auto", device: str = "auto", config: LlamaConfig | None = None,
               runtime: bool = True, pack: bool = True) -> Runtime | Llama:
    """Load a checkpoint folder strictly (names and shapes) in the chosen dtype and device.

    Returns the `Runtime` built from it (the default: fused q/k/v and gate/up, the reference weights released
    as they are laid out), or with `runtime=False` the reference `Llama` itself. `pack` lets the runtime
    prepack CPU weights for oneDNN (fp32, and bf16 where the CPU has native bf16): about twice as fast.
    """
    folder = Path(folder)
    config = config or load_config(folder)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev, config)
    files = find_weight_files(folder)
    with torch.device("meta"):
        model = Llama(config)
    need = expected_shapes(model)

    available = {n: p for n, p in files.items() if not n.endswith(IGNORED_SUFFIXES)}
    handles = {path: _open(path) for path in set(available.values())}
    use_embed_for_head = "lm_head.weight" not in available or config.tie_embeddings
    if config.tie_embeddings or "lm_head.weight" not in available:
        available.pop("lm_head.weight", None)
        need.pop("lm_head.weight", None)
    missing = [n for n in need if n not in available]
    if missing:
        where = folder / "model.safetensors.index.json" if (folder / "model.safetensors.index.json").exists() else folder
        raise WeightsError(f"{where}: missing tensor '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = [n for n in available if n not in need]
    if unexpected:
        raise WeightsError(
            f"{available[unexpected[0]]}: unexpected tensor '{unexpected[0]}'"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + " (is this a Llama checkpoint?)"
        )
    for name, shape in need.items():
        try:
            got = tuple(handles[available[name]].get_slice(name).get_shape())
        except (SafetensorError, Exception) as exc:  # corrupt header entries surface here
            raise WeightsError(f"{available[name]}: cannot read tensor '{name}' ({exc})") from None
        if got != shape:
            raise WeightsError(f"{available[name]}: tensor '{name}' has shape {list(got)}, expected {list(shape)}")

    params = dict(model.named_parameters(remove_duplicate=True))
    # A tensor read in its stored dtype is a view of the memory-mapped file, and the mapping lives as long
    # as any such tensor. When the weights are going to be packed (and the plain ones released), copy them
    # instead, so that the file's pages leave the process with the loader.
    copy = runtime and pack and dev.type == "cpu" and will_pack(torch_dtype)
    for name in need:
        try:
            tensor = handles[available[name]].get_tensor(name)
        except (SafetensorError, Exception) as exc:
            raise WeightsError(f"{available[name]}: tensor '{name}' is truncated or corrupt ({exc})") from None
        _assign(model, name, torch.nn.Parameter(tensor.to(device=dev, dtype=torch_dtype, copy=copy),
                                                requires_grad=False))
        del params[name]
    if use_embed_for_head:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    if runtime:
        return Runtime.build(model, pack=pack, release=True)
    return model


def _assign(model: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    setattr(owner, attr, param)
