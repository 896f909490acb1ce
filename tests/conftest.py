"""Fixtures shared by several test modules. Shared helper functions live in helper modules beside
the tests, imported by name (no test module imports another): workflow_runs (Snakemake runs and
dry-run parsing), stagekit (inputs and a runner for whole stages), edm_format (the official pickle
layouts), tiny_edm2 (tiny EDM2 networks), range_server (a local HTTP server), s3_server (moto's S3
API with a request log)."""

import http.server
import os
import threading
import uuid

import pytest
from range_server import RangeHandler
from s3_server import S3Server


def pytest_collection_modifyitems(items):
    """The SLURM tests first and together: pytest-xdist hands each process a run of consecutive tests,
    so one process runs them one after the other (they take turns on the host's one cluster,
    tests/slurm_cluster.py) while the other runs the rest, instead of one waiting for the other."""
    items.sort(key=lambda item: item.get_closest_marker("slurm") is None)


@pytest.fixture
def server():
    """The base URL of a RangeHandler server on 127.0.0.1, its request log emptied."""
    httpd = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.requests = []
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def s3_server():
    """An S3Server for the module's tests; boto3 finds it, and made-up credentials, where it finds a
    real service's: in the environment (which the Snakemake runs of a test inherit)."""
    server = S3Server()
    env = {"AWS_ENDPOINT_URL_S3": server.url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield server
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_endpoint(s3_server):
    """The S3 server's URL, its request log emptied."""
    s3_server.requests.clear()
    return s3_server.url


@pytest.fixture
def remote_url(s3_endpoint):
    """A remote store in a new bucket for each test, under a prefix in it."""
    import boto3

    bucket = f"cmt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/team/store"
