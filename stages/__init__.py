"""CMT pipeline stages. At this level stand exactly the scripts the Snakemake rules run, one per
rule and named like it (`python -m stages.<rule>`; `stages.launch` starts one over a job's GPUs).
The code they share lives in packages by concern, in layers (each imports only the ones below it;
tests/test_layers.py): core (rng, precision, what a stage does first), networks, files, data,
method, training (one loop and run for any recipe), config (stage configs, store keys, budgets),
recipes (one per training stage), reporting."""

__version__ = "0.1.0"
