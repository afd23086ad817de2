"""A small synthetic text corpus for command-line tests: random sentences over a fixed word
list, one document per file, deterministic in ``seed``."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

WORDS = ("the a one two small large red green river stone house garden quickly slowly walks "
         "runs sees finds under over near behind with and but because bird fish tree").split()


def write_corpus(folder: Path, n_docs: int = 24, seed: int = 0,
                 words: Sequence[str] = WORDS) -> Path:
    """``n_docs`` files ``docNN.txt`` of 15-30 sentences of 4-12 words drawn from ``words``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        sents = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize()
                 + "." for _ in range(rng.randint(15, 30))]
        (folder / f"doc{i:02d}.txt").write_text(" ".join(sents) + "\n", encoding="utf-8")
    return folder
