"""Data readers: raw-text corpora (corpus.py) and, beside them, the stage-specific formats."""
from gptlab.data.corpus import iter_documents, read_documents

__all__ = ["iter_documents", "read_documents"]
