"""Files and formats: atomic writes, model files, the restricted unpickler, official-weight imports, downloadable assets."""
