"""Near-duplicates: Jaccard similarity of character n-grams, found through MinHash LSH, verified exactly.

A row's text (its text fields joined) is normalized: Unicode NFKC, lower case, every run of characters that
are not letters or digits one space. Its shingles are the set of its character n-grams (`ngram`, default
5; a text shorter than that is one shingle). Two rows are near-duplicates when the Jaccard similarity of
their shingle sets, |A & B| / |A | B|, is at least the threshold (default 0.8): "the same example with a
few words changed".

Candidates come from MinHash signatures (128 hash functions) split into LSH bands, and every candidate is
verified with the Jaccard similarity of its shingle sets (held as 64-bit hashes, computed in numpy: about
0.3 ms for a 500-character text), so a reported near-duplicate is always one. A pair exactly at
the threshold is missed with probability (1 - t^r)^b: r rows per band chosen by the threshold (4 from 0.7,
2 from 0.4, else 1) keep that below 0.02% at 0.7, 0.002% at 0.4, and it shrinks fast above the threshold.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

PERMUTATIONS = 128
HASH_BASE = 1_000_003  # of the polynomial shingle hash
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


def shingle_hashes(text: str, n: int, unique: bool = True) -> Any:
    """The shingles of `text` (as `shingles` makes them) as sorted unique 64-bit hashes, computed in numpy:
    a polynomial hash over the characters' code points (what Index stores and compares; distinct shingles
    share a hash with a probability of about 2**-64 a pair)."""
    import numpy as np

    norm = normalize(text)
    codes = np.frombuffer(norm.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) <= n:  # one shingle: the whole text
        h = np.zeros(1, dtype=np.uint64)
        for c in codes:
            h = h * np.uint64(HASH_BASE) + c
        return h
    m = len(codes) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    for k in range(n):
        h = h * np.uint64(HASH_BASE) + codes[k:k + m]  # uint64 arithmetic wraps: a hash mod 2**64
    return np.unique(h) if unique else h  # a signature is a minimum: repeats do not change it (no sort)


def hashed_jaccard(a: Any, b: Any) -> float:
    import numpy as np

    if len(a) > len(b):
        a, b = b, a
    # Both sorted and unique: each of the smaller set's hashes looked up in the larger (no concatenate + sort).
    at = np.searchsorted(b, a)
    inter = int(np.count_nonzero(b[np.minimum(at, len(b) - 1)] == a)) if len(b) else 0
    union = len(a) + len(b) - inter
    return inter / union if union else 1.0


@lru_cache(maxsize=1)
def _permutations() -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(0)  # fixed: the same texts give the same signatures in every run and process
    # Multiply-shift hashing: (a*x + b) mod 2**64, top 32 bits; a odd. No division: numpy wraps uint64.
    a = rng.integers(0, 2**63, size=PERMUTATIONS, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=PERMUTATIONS, dtype=np.uint64)
    return a, b


def signature(hashes: Any) -> Any:
    """The MinHash signature of a text's shingle hashes: PERMUTATIONS minima, each below 2**32 (uint32)."""
    import numpy as np

    a, b = _permutations()
    # One row per permutation, its minimum along the row (contiguous): ~10% faster than shingles x permutations.
    m = np.multiply.outer(a, hashes)
    m += b[:, None]
    return (m.min(axis=1) >> np.uint64(32)).astype(np.uint32)  # the shift is monotone: min, then shift


def text_signature(text: str, n: int = 5) -> bytes:
    """`signature` of a text's shingles, as bytes: what prepare's tokenizer workers compute for each row, so
    the overlap check in the job's process only looks the bands up (Index.nearest_signed)."""
    return bytes(signature(shingle_hashes(text, n, unique=False)).data)


@dataclass
class Index:
    """Texts added so far; `nearest` finds the most similar one at or above the threshold."""

    threshold: float
    ngram: int = 5
    _sets: list[Any] = field(default_factory=list)
    _keys: list[str] = field(default_factory=list)
    _buckets: dict[tuple[int, bytes], list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rows = rows_per_band(self.threshold)

    def _bands(self, sig: Any) -> list[tuple[int, bytes]]:
        import numpy as np

        # Bucket keys as they were first defined: r uint64 minima per band, cut from one bytes object (a numpy
        # slice and tobytes per band cost ~5 us a row more, in the job's process, for every training row).
        raw = sig.astype(np.uint64).tobytes()
        width = 8 * self._rows
        return [(i, raw[i * width:(i + 1) * width]) for i in range(PERMUTATIONS // self._rows)]

    def nearest(self, text: str) -> tuple[str, float] | None:
        s = shingle_hashes(text, self.ngram)
        return self._best(self._bands(signature(s)), lambda: s)

    def nearest_signed(self, sig: bytes, text: Callable[[], str]) -> tuple[str, float] | None:
        """`nearest` for a text whose signature (text_signature) is known: the text is read, and its shingles
        computed, only when a band matches (rare: most rows have no near-duplicate)."""
        import numpy as np

        return self._best(self._bands(np.frombuffer(sig, dtype=np.uint32)),
                          lambda: shingle_hashes(text(), self.ngram))

    def _best(self, bands: list[tuple[int, bytes]], shingled: Callable[[], Any]) -> tuple[str, float] | None:
        seen: set[int] = set()
        best: tuple[str, float] | None = None
        s = None
        for band in bands:
            for j in self._buckets.get(band, ()):
                if j in seen:
                    continue
                seen.add(j)
                if s is None:
                    s = shingled()
                sim = hashed_jaccard(s, self._sets[j])
                if sim >= self.threshold and (best is None or sim > best[1]):
                    best = (self._keys[j], sim)
        return best

    def add(self, key: str, text: str) -> None:
        s = shingle_hashes(text, self.ngram)
        j = len(self._sets)
        self._sets.append(s)
        self._keys.append(key)
        for band in self._bands(signature(s)):
            self._buckets.setdefault(band, []).append(j)

    def __len__(self) -> int:
        return len(self._sets)
