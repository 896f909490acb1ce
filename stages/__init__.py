"""CMT pipeline stages. At this level stand exactly the scripts the Snakemake rules run, one per
rule and named like it (`python -m stages.<rule>`; `stages.launch` starts one over a job's GPUs).
The code they share lives in subpackages by concern: networks, method, training, data, files,
runtime, config."""

__version__ = "0.1.0"
