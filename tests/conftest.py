"""Fixtures shared by several test modules. Shared helper functions live in helper modules beside
the tests, imported by name (no test module imports another): workflow_runs (Snakemake runs and
dry-run parsing), stagekit (inputs and a runner for whole stages), edm_format (the official pickle
layouts), tiny_edm2 (tiny EDM2 networks), range_server (a local HTTP server)."""

import http.server
import threading

import pytest
from range_server import RangeHandler


@pytest.fixture
def server():
    """The base URL of a RangeHandler server on 127.0.0.1, its request log emptied."""
    httpd = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.requests = []
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
