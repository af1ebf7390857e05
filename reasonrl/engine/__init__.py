"""reasonrl.engine: a paged KV-cache rollout engine (sequence, block_manager, scheduler, runner, sampler)."""
from reasonrl.engine.llm_engine import LLMEngine
from reasonrl.engine.sequence import Completion, SamplingParams

__all__ = ["LLMEngine", "SamplingParams", "Completion"]
