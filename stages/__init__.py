"""CMT pipeline stages: one module per Snakemake stage plus the shared pieces they import."""

__version__ = "0.1.0"
