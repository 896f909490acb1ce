"""Time and peak memory of one MeanFlow training step against one plain flow-matching step of the
same network and batch (the issue's bound: at most 3x the time and 2x the memory).

Variants, each measured in a fresh process so peak memory is its own:
  fm         u(z, t, t) regressed onto v: forward, backward, Adam step
  meanflow   the pipeline's step: no-graph JVP on the bare module, then a graph forward (through
             the DDP wrapper when there is one) with the same dropout mask
  jvp_graph  the single-pass alternative: one JVP with a graph, backward through its primal output
             (it keeps the tangent's activations too: over the 2x memory bound, see RESULTS.md)

Memory: on CUDA the allocator's peak (torch.cuda.max_memory_allocated); on CPU the rise of the
process's peak RSS (ru_maxrss) over its value once model and data are in place, before the first
step. RSS is coarse, so the batch is large enough for activations to dominate.

    python bench/meanflow_step.py [--batch 1024] [--steps 20] [--threads 1]
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_variant(name, batch, steps, threads, channels):
    import torch

    sys.path.insert(0, str(ROOT))
    from stages.files import checkpoints
    from stages.method import meanflow

    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = {"architecture": {"kind": "small_unet", "in_channels": 1, "resolution": 8, "channels": channels,
                             "channel_mult": [1, 2], "num_blocks": 1, "dropout": 0.1},
            "precond": "meanflow", "sigma_data": 0.5, "sigma_min": 0.002}
    torch.manual_seed(0)
    u = checkpoints.build(meta).to(device).train()
    opt = torch.optim.Adam(u.parameters(), lr=1e-4, betas=(0.9, 0.95))
    x = torch.randn(batch, 1, 8, 8, device=device)

    def step(i):
        g = torch.Generator().manual_seed(i)
        r, t = meanflow.sample_r_t(batch, g)
        r, t = r.float().to(device), t.float().to(device)
        eps = torch.randn(x.shape, generator=g).to(device)
        z, v = meanflow.linear_path(x, eps, t)
        if name == "fm":
            loss = meanflow.flow_matching_loss_at(u, z, t, v)
        elif name == "meanflow":
            loss = meanflow.meanflow_loss_at(u, z, r, t, v, jvp_u=u)
        else:
            loss = meanflow.meanflow_loss_at(u, z, r, t, v)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()

    # Baseline before the first step: model, data and the imported libraries. The peak then covers
    # every step (the first one included, with its allocation of Adam's moments, 2 x parameters).
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step(-1)  # warm-up, not timed
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times.sort()
    print(json.dumps({"variant": name, "device": str(device), "median_s": times[len(times) // 2],
                      "peak_bytes_over_baseline": peak, "peak_total_bytes": peak + base}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        return run_variant(a.variant, a.batch, a.steps, a.threads, a.channels)
    results = {}
    for name in ("fm", "meanflow", "jvp_graph"):
        out = subprocess.run([sys.executable, __file__, "--variant", name, "--batch", str(a.batch),
                              "--steps", str(a.steps), "--threads", str(a.threads), "--channels", str(a.channels)],
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    fm = results["fm"]
    print(f"device {fm['device']}, SmallUNet channels {a.channels}, batch {a.batch}, {a.steps} steps, "
          f"threads {a.threads}")
    print(f"{'variant':<13} {'median step (ms)':>17} {'x fm':>6} {'peak mem over baseline (MiB)':>29} {'x fm':>6}")
    for name, r in results.items():
        print(f"{name:<13} {1e3 * r['median_s']:>17.1f} {r['median_s'] / fm['median_s']:>6.2f} "
              f"{r['peak_bytes_over_baseline'] / 2**20:>29.1f} "
              f"{r['peak_bytes_over_baseline'] / max(fm['peak_bytes_over_baseline'], 1):>6.2f}")
    for name in ("meanflow", "jvp_graph"):
        mf = results[name]
        t_ratio = mf["median_s"] / fm["median_s"]
        m_ratio = mf["peak_bytes_over_baseline"] / max(fm["peak_bytes_over_baseline"], 1)
        print(f"{name} step: {t_ratio:.2f}x time (bound 3x: {'within' if t_ratio <= 3 else 'EXCEEDED'}), "
              f"{m_ratio:.2f}x memory (bound 2x: {'within' if m_ratio <= 2 else 'EXCEEDED'})")


if __name__ == "__main__":
    main()
