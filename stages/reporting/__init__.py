"""What the report stage reads and draws: the cost ledger from the jobs' benchmarks and records
(ledger.py), the row's tables and figures (tables.py, figures.py)."""
