"""Data layer: bundled corpus, offline tokenizers, document sources, token caches,
sequence layouts and deterministic resumable batches."""
from .cache import TokenCache, build_or_load_cache
from .layouts import BatchIterator, CropPadDataset, DataBundle, PackedDataset, build_data
from .sources import load_documents, split_documents
from .tokenizer import Tokenizer, get_tokenizer

__all__ = [
    "BatchIterator", "CropPadDataset", "DataBundle", "PackedDataset", "Tokenizer",
    "TokenCache", "build_data", "build_or_load_cache", "get_tokenizer", "load_documents",
    "split_documents",
]
