"""Data layer: bundled corpus, offline tokenizers, document sources, token caches,
sequence layouts (dense and ragged), deterministic resumable batches, batch helpers and
length histograms."""
from .batches import (collate_ragged, is_ragged, num_rows, num_tokens, row_lengths, slice_rows,
                      split_micro, to_device)
from .cache import TokenCache, build_or_load_cache
from .histogram import length_stats, write_length_histogram
from .layouts import (BatchIterator, CropPadDataset, DataBundle, PackedBosDataset, PackedDataset,
                      VarLenDataset, build_data, write_length_report)
from .sources import load_documents, paragraph_documents, split_documents
from .tokenizer import Tokenizer, get_tokenizer

__all__ = [
    "BatchIterator", "CropPadDataset", "DataBundle", "PackedBosDataset", "PackedDataset",
    "Tokenizer", "TokenCache", "VarLenDataset", "build_data", "build_or_load_cache",
    "collate_ragged", "get_tokenizer", "is_ragged", "length_stats", "load_documents",
    "num_rows", "num_tokens", "paragraph_documents", "row_lengths", "slice_rows",
    "split_documents", "split_micro", "to_device", "write_length_histogram",
    "write_length_report",
]
