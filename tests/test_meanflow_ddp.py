"""The MeanFlow JVP under multi-process training: 2 CPU processes (torchrun, gloo) take one step
through loop.fit; their all-reduced gradients agree with each other and with the gradient
of the same global batch computed in one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.heavy
def test_two_process_meanflow_gradients_agree(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(REPO / "tests" / "helpers" / "ddp_meanflow_worker.py"),
           str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    g0, g1, ref = (torch.load(tmp_path / f"grads_{n}.pt") for n in ("rank0", "rank1", "reference"))
    assert set(g0) == set(ref) and len(g0) > 10
    for name in ref:
        torch.testing.assert_close(g0[name], g1[name], rtol=0, atol=0, msg=f"ranks disagree on {name}")
        torch.testing.assert_close(g0[name], ref[name], rtol=1e-4, atol=1e-6, msg=f"DDP != reference on {name}")
    assert sum(float(g.abs().sum()) for g in ref.values()) > 0
