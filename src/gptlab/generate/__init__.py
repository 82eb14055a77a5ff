"""The generate stage: text from a trained GPT (batched prompts, KV cache, streaming, best-of-N)."""

from gptlab.generate.sampling import (
    filter_logits,
    generate,
    next_token,
    prompt_ids,
    sample_tokens,
    start_id,
)

__all__ = ["filter_logits", "generate", "next_token", "prompt_ids", "sample_tokens", "start_id"]
