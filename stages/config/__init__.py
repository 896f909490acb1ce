"""Config checks across keys (run by the Snakefile before any job starts) and command-line overrides."""
