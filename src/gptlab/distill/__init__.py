"""The distil stage: a teacher's text as a student's training data (sequence-level knowledge distillation)."""

from gptlab.distill.filters import filter_corpus as filter_corpus  # exported beside them
from gptlab.distill.synthetic import distill_corpus, load_teacher, read_prompts

__all__ = ["distill_corpus", "load_teacher", "read_prompts"]
