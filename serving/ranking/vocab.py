"""Id -> index for a whole request at once: an open-addressing hash table over the vocabulary's
string hashes that numpy builds and probes in bulk, so that mapping 1,000 ids costs one hash per
id (in C) and a few vectorised probes, with no Python work per id."""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

# The table is at most this full: most ids resolve at the first probe, nearly all by the second.
MAX_LOAD = 0.25


class HashTableVocabulary:
    """Indices of many ids in one call.

    Python's str hash (SipHash, keyed per process) of every vocabulary id sits in a power-of-two
    table at least 1 / MAX_LOAD times the vocabulary's size, at the first free slot from the
    hash's low bits (linear probing), beside the id's index. A lookup hashes the query ids with
    `map(hash, ...)` and resolves every id still pending one probe at a time, in as many rounds
    as the table's longest probe sequence: an equal hash is a match, an empty slot an unknown id.
    Ids whose first slot holds another id (about MAX_LOAD of them) read the rest of that longest
    sequence in one vectorised step.
    An unknown id whose 64-bit hash equals a known id's is taken for it, with probability about
    len(vocabulary) / 2**64 per lookup; a vocabulary in which two ids share a hash is refused
    (ValueError: the caller keeps to exact dict lookups)."""

    def __init__(self, ids: list[str], max_load: float = MAX_LOAD) -> None:
        if not 0 < max_load < 1:
            raise ValueError(f"max_load {max_load} is not in (0, 1)")
        self.size = len(ids)
        hashes = np.fromiter(map(hash, ids), np.int64, len(ids))
        if len(np.unique(hashes)) != len(hashes):
            raise ValueError("two ids of the vocabulary share a string hash")
        capacity = 1 << max(4, int(np.ceil(len(ids) / max_load) - 1).bit_length())
        self.mask = capacity - 1
        # Slot s is pairs[2s] (the hash) and pairs[2s + 1] (the index, -1 when empty), side by
        # side so that a probe misses the cache once.
        self.pairs = np.zeros(2 * capacity, np.int64)
        self.pairs[1::2] = -1
        self.keys, self.slots = self.pairs[0::2], self.pairs[1::2]  # views
        self.max_probes = self._insert(hashes)
        self._window = np.arange(self.max_probes, dtype=np.int64)

    def _insert(self, hashes: np.ndarray) -> int:
        """Place every index at the first free slot from its hash; returns the longest probe
        sequence (the rounds a lookup may need)."""
        pending = np.arange(len(hashes), dtype=np.int64)
        pos = hashes & self.mask
        rounds = 0
        while pending.size:
            rounds += 1
            free = np.flatnonzero(self.slots[pos] < 0)
            # Among the pending ids whose slot is free, the first for each slot takes it.
            _, first = np.unique(pos[free], return_index=True)
            winners = free[first]
            self.slots[pos[winners]] = pending[winners]
            self.keys[pos[winners]] = hashes[pending[winners]]
            rest = np.ones(pending.size, bool)
            rest[winners] = False
            pending, pos = pending[rest], (pos[rest] + 1) & self.mask
        return max(rounds, 1)

    def lookup(self, ids: list[str]) -> np.ndarray:
        """Indices of `ids` (-1 for ids not in the vocabulary)."""
        query = np.fromiter(map(hash, ids), np.int64, len(ids))
        out = np.full(len(ids), -1, np.int64)
        at = (query & self.mask) << 1
        hit = self.pairs.take(at) == query
        index = self.pairs.take(at + 1)
        out[hit] = index[hit]  # an empty slot's index is -1 anyway
        # Occupied by another id (about MAX_LOAD of them): the rest of the longest probe
        # sequence at once, a row of slots per id; the first equal key before an empty slot.
        pending = np.flatnonzero(~hit & (index >= 0))
        if pending.size and self.max_probes > 1:
            window = (((at[pending, None] >> 1) + self._window[1:]) & self.mask) << 1
            equal = self.pairs.take(window) == query[pending, None]
            index = self.pairs.take(window + 1)
            empty = index < 0
            # A probe sequence ends at the first empty slot: equal keys past it do not count.
            before_empty = np.cumsum(empty, axis=1) == 0
            found = equal & before_empty
            first = found.argmax(axis=1)
            rows = np.flatnonzero(found.any(axis=1))
            out[pending[rows]] = index[rows, first[rows]]
        return out


def build_vocabulary(ids: list[str]) -> HashTableVocabulary | None:
    """The table for `ids`, or None (with the reason logged) where it cannot hold them: dict
    lookups serve those vocabularies."""
    try:
        return HashTableVocabulary(ids)
    except ValueError as exc:
        logger.warning("Item ids are looked up one by one: %s", exc)
        return None
