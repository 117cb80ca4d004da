"""The quantization a checkpoint declares: `Quantization` (bits, int4 group size, the matrices stored in other
bits, where the weights came from) and its `quantization_config` entry in config.json. No torch here.

The tensors each matrix then has are `layout.quantized_table`'s; `llamacli.quant` quantizes and multiplies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llamacli.errors import WeightsError

QUANT_METHOD = "llamacli"
# The layout of the tensors (`layout.quantized_table`): int8 per row, symmetric; int4 per group, affine, two
# values per byte, the even column in the low nibble. The embedding table and the lm_head are int8 unless
# `matrix_bits` says otherwise (the tied table is stored once).
QUANT_LAYOUT = "int8-rows-symmetric / int4-groups-affine-u8-low-nibble-first"
QUANT_BITS = (8, 4)
QUANT_GROUP_SIZES = (32, 64, 128)
TABLES = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class Quantization:
    """How a checkpoint's matrices are quantized: 8 (per row) or 4 bits (per group of `group_size` columns).

    `overrides` names the matrices stored in other bits than that rule gives (a GGUF's Q6_K matrices beside its
    Q4_K ones); `source` says where the weights came from (a GGUF's types), for `inspect`."""

    bits: int
    group_size: int | None = None  # when any matrix is int4
    overrides: dict[str, int] = field(default_factory=dict, hash=False)
    source: str | None = None

    def config_entry(self) -> dict:
        """The `quantization_config` of config.json for this quantization."""
        entry = {"quant_method": QUANT_METHOD, "layout": QUANT_LAYOUT, "bits": self.bits,
                 "group_size": self.group_size, "embedding_bits": matrix_bits(TABLES[0], self),
                 "lm_head_bits": matrix_bits(TABLES[1], self)}
        if self.overrides:
            entry["matrix_bits"] = dict(self.overrides)
        if self.source:
            entry["source"] = self.source
        return entry

    def describe(self) -> str:
        """'int8 per row' or 'int4 groups of 32', with the matrices in other bits and the source."""
        text = "int8 per row" if self.bits == 8 else f"int4 groups of {self.group_size}"
        others = [n for n in self.overrides if n not in TABLES]  # the tables are in no rule's bits
        if others:
            text += f" ({len(others)} matrices int{4 if self.bits == 8 else 8})"
        return text + (f", from {self.source}" if self.source else "")


def read_quantization(folder: Path) -> Quantization | None:
    """The quantization config.json declares (None for a float checkpoint); WeightsError for one we cannot read."""
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None  # config.py reports an unreadable config.json
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("quant_method") != QUANT_METHOD:
        method = raw.get("quant_method") if isinstance(raw, dict) else raw
        raise WeightsError(f"{path}: quantization_config.quant_method {method!r} is not supported "
                           f"(llamacli reads its own '{QUANT_METHOD}' checkpoints; load the float one)")
    bits, group, overrides = raw.get("bits"), raw.get("group_size"), raw.get("matrix_bits", {})
    if bits not in QUANT_BITS:
        raise WeightsError(f"{path}: quantization_config.bits is {bits!r}, expected 8 or 4")
    if not isinstance(overrides, dict) or not all(isinstance(n, str) and b in QUANT_BITS
                                                  for n, b in overrides.items()):
        raise WeightsError(f"{path}: quantization_config.matrix_bits must map matrix names to 8 or 4")
    int4 = bits == 4 or 4 in overrides.values()
    if int4 and group not in QUANT_GROUP_SIZES:
        raise WeightsError(f"{path}: quantization_config.group_size is {group!r}, expected one of "
                           f"{', '.join(map(str, QUANT_GROUP_SIZES))}")
    source = raw.get("source")
    return Quantization(bits, group if int4 else None, overrides, source if isinstance(source, str) else None)


def matrix_bits(name: str, quant: Quantization) -> int:
    """The bits a matrix is stored in: its override, else 8 for the embedding and lm_head, else `quant.bits`."""
    if name in quant.overrides:
        return quant.overrides[name]
    return 8 if name in TABLES else quant.bits
