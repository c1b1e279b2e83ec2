"""Continuous batching: engine config, requests, scheduler (over the KV manager), model runner, engine."""

from fms.serving.config import EngineConfig
from fms.serving.engine import LLMEngine, StepOutput
from fms.serving.request import FinishReason, Request, RequestOutput, RequestState, SamplingParams
from fms.serving.scheduler import ScheduledChunk, Scheduler, SchedulerOutput

__all__ = [
    "EngineConfig", "LLMEngine", "StepOutput", "FinishReason", "Request", "RequestOutput", "RequestState",
    "SamplingParams", "ScheduledChunk", "Scheduler", "SchedulerOutput",
]
