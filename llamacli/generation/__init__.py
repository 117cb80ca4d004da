"""Generation on a loaded model: the engine (single prompts), the open batch scheduler, chat sessions, and the
one token state machine (`Sequence`) they all drive."""

from llamacli.generation.chat import ChatSession
from llamacli.generation.engine import Engine
from llamacli.generation.scheduler import PREFILL_TOKENS_PER_STEP, Scheduler, generate_batch, plan_admissions, scheduler_for
from llamacli.generation.sequence import Sequence, StopMatcher
from llamacli.request import Finished, Request, SamplingParams, Stats, TextEvent, TokenEvent

__all__ = ["ChatSession", "Engine", "Finished", "PREFILL_TOKENS_PER_STEP", "Request", "SamplingParams", "Scheduler",
           "Sequence", "Stats", "StopMatcher", "TextEvent", "TokenEvent", "generate_batch", "plan_admissions",
           "scheduler_for"]
