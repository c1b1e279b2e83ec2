"""Host side of continuous batching: requests, scheduler, prefix cache, model runner, engine."""

from fms.serving.engine import LLMEngine, StepOutput
from fms.cache.prefix_cache import PrefixCache
from fms.serving.request import FinishReason, Request, RequestOutput, RequestState, SamplingParams
from fms.serving.scheduler import ScheduledChunk, Scheduler, SchedulerOutput

__all__ = [
    "LLMEngine", "StepOutput", "PrefixCache", "FinishReason", "Request", "RequestOutput", "RequestState",
    "SamplingParams", "ScheduledChunk", "Scheduler", "SchedulerOutput",
]
