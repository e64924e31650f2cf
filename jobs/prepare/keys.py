"""Compact sets of 64-bit row keys: what prepare's job process remembers per row it has seen.

Duplicate detection (`dedup: exact | normalized`) and the numbering of repeated rows (`dedup: none`) keep one
key per distinct row for the whole run (rows.exact_key / normalized_key: 64-bit hashes). As Python ints in a
set or Counter that is ~90 bytes a row (the int object, the hash table's entry and its slack): ~90 MiB at
1M rows, growing with the input where the README promises flat memory. Here a key is 8 bytes in an
open-addressing table (`array('Q')`, at most half full, linear probing): ~16-32 bytes a row.
"""

from __future__ import annotations

from array import array

_EMPTY = 0  # marks a free slot; the key 0 itself is remembered by a flag


class KeySet:
    """A set of 64-bit unsigned keys (the keys are hashes already: their low bits pick the slot)."""

    def __init__(self, capacity: int = 1 << 16):
        self._slots = array("Q", bytes(8 * capacity))
        self._mask = capacity - 1
        self._n = 0
        self._zero = False

    def __len__(self) -> int:
        return self._n + self._zero

    def __contains__(self, key: int) -> bool:
        if key == _EMPTY:
            return self._zero
        slots, mask = self._slots, self._mask
        i = key & mask
        while True:
            k = slots[i]
            if k == key:
                return True
            if k == _EMPTY:
                return False
            i = (i + 1) & mask

    def add(self, key: int) -> bool:
        """Remember a key; True when it is new."""
        if key == _EMPTY:
            new, self._zero = not self._zero, True
            return new
        slots, mask = self._slots, self._mask
        i = key & mask
        while True:
            k = slots[i]
            if k == key:
                return False
            if k == _EMPTY:
                slots[i] = key
                self._n += 1
                if 2 * self._n > mask:
                    self._grow()
                return True
            i = (i + 1) & mask

    def _grow(self) -> None:
        old = self._slots
        self._slots = array("Q", bytes(16 * len(old)))
        self._mask = 2 * len(old) - 1
        self._n = 0
        for key in old:
            if key != _EMPTY:
                self.add(key)


class Repeats:
    """How many times each key came before: `seen(key)` is 0 for a first occurrence, n for the n-th repeat.

    Keys live in a KeySet; only keys that do repeat (rare) get a count of their own."""

    def __init__(self) -> None:
        self._keys = KeySet()
        self._more: dict[int, int] = {}

    def seen(self, key: int) -> int:
        if self._keys.add(key):
            return 0
        occurrence = self._more.get(key, 1)
        self._more[key] = occurrence + 1
        return occurrence

    def __len__(self) -> int:
        return len(self._keys)
