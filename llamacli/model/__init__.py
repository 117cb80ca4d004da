"""The Llama model: the reference modules (`Llama`, the readable spec and test oracle) and the `Runtime` built
from them at load time (the fast forward engines call), with its weight formats and CPU dtype policy."""

from __future__ import annotations

from llamacli.model.llama import Llama
from llamacli.model.runtime import Runtime

__all__ = ["Llama", "Runtime"]
