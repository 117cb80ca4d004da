"""What a caller asks for and what it gets back: sampling parameters, requests, stats and the events of a
generation. No torch here, so the CLI, batch files and the server can build and read them cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llamacli.errors import UsageError
from llamacli.text import check_text

# Why a generation ended: an eos id or a stop string, the max_new_tokens budget, or the caller cancelled it.
STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs

# Most tokens speculative decoding drafts per round unless told (--draft-tokens): each round then drafts the k in
# 1..8 its cost model expects fastest. From `benchmarks/bench_speculative.py --adaptive-ks 4,8` (SmolLM2-135M,
# 2 threads, AVX2 EPYC; x plain decoding, adaptive K<=8 vs K<=4): prompt lookup, whose drafts cost nothing, on the
# rewrite workload 3.01-3.05 vs 2.60-2.66, 3.43 vs 2.70, 3.10 vs 2.86 (medians of 3 and 5 repetitions), on the
# story 1.03-1.05 vs 1.06, 0.86 vs 0.88, 1.06 vs 1.04; the int4 self-draft (`--kinds int4 --ks 8 --adaptive-ks 4,8
# --repeat 5`, and earlier runs) rewrite 1.23 vs 1.18, 1.42 vs 1.28, 1.32 vs 1.25-1.31, story 1.23 vs 1.20, 1.15 vs
# 1.15, 1.12 vs 1.23-1.29: K<=8 ahead or even in all but one run.
DEFAULT_DRAFT_TOKENS = 8


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 = greedy; top_k 0, top_p 1, min_p 0, penalty 1 = off.

    presence_penalty / frequency_penalty (OpenAI's, in [-2, 2], 0 = off) subtract from the logit of each token
    already generated: once, and once per time it was generated.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        validate_sampling(self)

    @property
    def greedy(self) -> bool:
        """True when the choice is argmax (no randomness)."""
        return self.temperature == 0 or self.top_k == 1


def validate_sampling(p: SamplingParams) -> None:
    """Raise UsageError naming the option whose value is out of range."""
    def number(value, name):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise UsageError(f"{name} must be a number, got {value!r}")

    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        number(getattr(p, name), name.replace("_", "-"))
    if p.temperature < 0:
        raise UsageError(f"temperature must be >= 0, got {p.temperature}")
    if isinstance(p.top_k, bool) or not isinstance(p.top_k, int) or p.top_k < 0:
        raise UsageError(f"top-k must be an integer >= 0, got {p.top_k!r}")
    if not 0 < p.top_p <= 1:
        raise UsageError(f"top-p must be in (0, 1], got {p.top_p}")
    if not 0 <= p.min_p <= 1:
        raise UsageError(f"min-p must be in [0, 1], got {p.min_p}")
    if p.repetition_penalty <= 0:
        raise UsageError(f"repetition-penalty must be > 0, got {p.repetition_penalty}")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(p, name) <= 2:
            raise UsageError(f"{name.replace('_', '-')} must be in [-2, 2], got {getattr(p, name)}")


def check_seed(seed) -> None:
    """Raise UsageError unless seed is None or an integer in [0, 2**63)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise UsageError(f"seed must be an integer in [0, 2**63), got {seed!r}")


@dataclass(frozen=True)
class Request:
    """What to generate after a prompt, besides the prompt itself."""

    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # with logprobs: also the k most likely tokens at each step (0..20)

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UsageError(f"max-new-tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise UsageError("stop strings must be non-empty text")
        for s in self.stop:
            check_text(s, "a stop string", UsageError)
        check_seed(self.seed)
        if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int) or \
                not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise UsageError(f"top-logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")
        if self.top_logprobs and not self.logprobs:
            raise UsageError("top-logprobs needs logprobs")


@dataclass
class Stats:
    """Counts and timings of one generation (seconds; rates in tokens per second)."""

    prompt_tokens: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    # Speculative decoding only (`draft` names the draft kind; empty: plain decoding, and as_dict leaves them out).
    draft: str = ""
    drafted_tokens: int = 0  # tokens proposed by the draft and verified by the model
    accepted_tokens: int = 0  # of those, the ones the model kept
    verify_forwards: int = 0  # model forwards over several positions (each also yields one token of its own)

    @property
    def acceptance_rate(self) -> float:
        """Accepted over drafted tokens (0 when nothing was drafted)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def prefill_tps(self) -> float:
        """Prefill speed over the tokens actually prefilled."""
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        """Decode speed: tokens after the first, over the time spent producing them."""
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        """Plain numbers for JSON output."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "prefill_tokens": self.prefill_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_s": round(self.prefill_s, 6),
            "ttft_s": round(self.ttft_s, 6),
            "decode_s": round(self.decode_s, 6),
            "prefill_tokens_per_s": round(self.prefill_tps, 3),
            "decode_tokens_per_s": round(self.decode_tps, 3),
            **self.draft_dict(),
        }

    def draft_dict(self) -> dict:
        """The speculative-decoding counts as plain numbers ({} for plain decoding)."""
        if not self.draft:
            return {}
        return {"draft": self.draft, "drafted_tokens": self.drafted_tokens, "accepted_tokens": self.accepted_tokens,
                "acceptance_rate": round(self.acceptance_rate, 4), "verify_forwards": self.verify_forwards}


@dataclass
class TextEvent:
    """Text to show; the last one of a stream carries what the detokenizer held back until the end."""

    text: str


@dataclass
class TokenEvent(TextEvent):
    """One generated token and the text it completed (may be '' while a character or stop is pending)."""

    token_id: int = -1
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, log-probability), most likely first


@dataclass
class Finished:
    """The end of a generation: why it ended, everything produced, and the stats."""

    reason: str  # STOP (eos id or stop string), LENGTH (max_new_tokens) or CANCELLED
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    stats: Stats
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, when the request asked for them


Event = TextEvent | Finished
