"""Near-duplicates: Jaccard similarity of character n-grams, found through MinHash LSH, verified exactly.

A row's text (its text fields joined) is normalized: Unicode NFKC, lower case, every run of characters that
are not letters or digits one space. Its shingles are the set of its character n-grams (`ngram`, default
5; a text shorter than that is one shingle). Two rows are near-duplicates when the Jaccard similarity of
their shingle sets, |A & B| / |A | B|, is at least the threshold (default 0.8): "the same example with a
few words changed".

Candidates come from MinHash signatures (128 hash functions) split into LSH bands, and every candidate is
verified with the exact Jaccard similarity, so a reported near-duplicate is always one. A pair exactly at
the threshold is missed with probability (1 - t^r)^b: r rows per band chosen by the threshold (4 from 0.7,
2 from 0.4, else 1) keep that below 0.02% at 0.7, 0.002% at 0.4, and it shrinks fast above the threshold.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from dataclasses import dataclass, field
from typing import Any

PERMUTATIONS = 128
PRIME = (1 << 31) - 1  # a*x + b stays below 2**63 for 32-bit x: uint64 arithmetic does not overflow
NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    return NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def shingles(text: str, n: int) -> frozenset[str]:
    norm = normalize(text)
    if len(norm) <= n:
        return frozenset([norm])
    return frozenset(norm[i:i + n] for i in range(len(norm) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def rows_per_band(threshold: float) -> int:
    return 4 if threshold >= 0.7 else 2 if threshold >= 0.4 else 1


@dataclass
class Index:
    """Texts added so far; `nearest` finds the most similar one at or above the threshold."""

    threshold: float
    ngram: int = 5
    _sets: list[frozenset[str]] = field(default_factory=list)
    _keys: list[str] = field(default_factory=list)
    _buckets: dict[tuple[int, bytes], list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import numpy as np

        rng = np.random.default_rng(0)  # fixed: the same texts give the same signatures in every run
        self._a = rng.integers(1, PRIME, size=PERMUTATIONS, dtype=np.uint64)
        self._b = rng.integers(0, PRIME, size=PERMUTATIONS, dtype=np.uint64)
        self._rows = rows_per_band(self.threshold)

    def _bands(self, s: frozenset[str]) -> list[tuple[int, bytes]]:
        import numpy as np

        x = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in s), dtype=np.uint64, count=len(s))
        sig: Any = ((np.outer(x, self._a) + self._b) % PRIME).min(axis=0)
        r = self._rows
        return [(i, sig[i * r:(i + 1) * r].tobytes()) for i in range(PERMUTATIONS // r)]

    def nearest(self, text: str) -> tuple[str, float] | None:
        s = shingles(text, self.ngram)
        seen: set[int] = set()
        best: tuple[str, float] | None = None
        for band in self._bands(s):
            for j in self._buckets.get(band, ()):
                if j in seen:
                    continue
                seen.add(j)
                sim = jaccard(s, self._sets[j])
                if sim >= self.threshold and (best is None or sim > best[1]):
                    best = (self._keys[j], sim)
        return best

    def add(self, key: str, text: str) -> None:
        s = shingles(text, self.ngram)
        j = len(self._sets)
        self._sets.append(s)
        self._keys.append(key)
        for band in self._bands(s):
            self._buckets.setdefault(band, []).append(j)

    def __len__(self) -> int:
        return len(self._sets)
