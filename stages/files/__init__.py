"""Files and formats: atomic writes, the store (records, locks, receipts), model files, the restricted unpickler,
official-weight imports, downloadable assets."""
