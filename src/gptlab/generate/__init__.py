"""The generate stage: text from a trained GPT (batched prompts, KV cache, streaming, best-of-N ranked by the model,
a teacher or a user function), replies from a chat model."""

from gptlab.generate.chat import (
    ChatPrompt,
    chat_prompt,
    chat_replies,
    chat_reply,
    read_messages,
)
from gptlab.generate.sampling import (
    filter_logits,
    generate,
    next_token,
    prompt_ids,
    sample_candidates,
    sample_tokens,
    start_id,
)

__all__ = ["ChatPrompt", "chat_prompt", "chat_replies", "chat_reply", "filter_logits", "generate", "next_token",
           "prompt_ids", "read_messages", "sample_candidates", "sample_tokens", "start_id"]
