"""The one training loop, its resumable state, and randomness folded from (seed, step, rank, purpose)."""
