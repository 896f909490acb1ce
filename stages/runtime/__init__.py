"""How a stage process starts: arguments, threads and numerical settings."""
