"""Distinct words for bench events: one word per index, so each index is its own incident.

The letters are not hex digits: the fingerprint normaliser (mendloop/intake/fingerprint.py) replaces hex runs and
numbers but keeps these, so `worker {distinct_word(i)} crashed` has a fingerprint of its own for every i.
"""

from __future__ import annotations

_LETTERS = "ghijklmnopqrstuvwxyz"


def distinct_word(i: int) -> str:
    out = ""
    while True:
        i, r = divmod(i, len(_LETTERS))
        out += _LETTERS[r]
        if not i:
            return out
