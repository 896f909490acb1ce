"""Randomness derived from (seed, step, rank, purpose), so resumed, re-split and multi-process runs
draw exactly the numbers an uninterrupted single-process run draws."""

import hashlib

import torch


def fold(*parts) -> int:
    """A 63-bit seed that is a pure function of `parts` (ints and strings)."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def generator(*parts, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(fold(*parts))
    return g
