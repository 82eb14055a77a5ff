"""The text stage: read corpora as documents, normalise them, download known datasets."""

from gptlab.text.conversations import Conversation, is_conversation_source, iter_conversations, read_conversations
from gptlab.text.download import KNOWN_DATASETS, download_dataset, list_datasets
from gptlab.text.normalize import Normalizer
from gptlab.text.sources import (
    iter_documents,
    iter_source_documents,
    resolve_source_files,
    source_format,
    source_label,
)

__all__ = [
    "Conversation",
    "is_conversation_source",
    "iter_conversations",
    "read_conversations",
    "KNOWN_DATASETS",
    "Normalizer",
    "download_dataset",
    "iter_documents",
    "iter_source_documents",
    "list_datasets",
    "resolve_source_files",
    "source_format",
    "source_label",
]
