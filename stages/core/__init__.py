"""The ground floor every other package may use: randomness folded from (seed, step, rank, purpose)
(rng.py), the TF32 flags of a process (precision.py), what every stage script does first (cli.py)."""
