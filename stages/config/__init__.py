"""The configuration: how the workflow assembles it from files and the command line (layers.py)
and the checks across keys that run before any job starts (checks.py)."""
