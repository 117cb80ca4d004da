"""Generation on a loaded model: the engine (single prompts), the open batch scheduler, speculative decoding, chat
sessions, and the
one token state machine (`Sequence`) they all drive."""

from llamacli.generation.admission import PREFILL_TOKENS_PER_STEP, plan_admissions
from llamacli.generation.chat import ChatSession
from llamacli.generation.engine import Engine
from llamacli.generation.scheduler import Scheduler, generate_batch, scheduler_for
from llamacli.generation.sequence import Sequence, StopMatcher
from llamacli.generation.speculative import DraftModel, PromptLookup, Speculator
from llamacli.request import Finished, Request, SamplingParams, Stats, TextEvent, TokenEvent

__all__ = ["ChatSession", "DraftModel", "Engine", "Finished", "PREFILL_TOKENS_PER_STEP", "PromptLookup", "Request", "SamplingParams", "Scheduler",
           "Sequence", "Speculator", "Stats", "StopMatcher", "TextEvent", "TokenEvent", "generate_batch", "plan_admissions",
           "scheduler_for"]
