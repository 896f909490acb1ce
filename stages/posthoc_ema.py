"""Stage posthoc_ema: the EMA of each width in the config's `sigma_rels`, synthesised at the point
`at` of training (a fraction of the run's steps, at a snapshot) from the power-function EMA snapshots
a run kept (`--phema`, the `phema/` folder beside its model file) by EDM2's least squares over the
snapshots at or before it (stages/method/power_ema.py). Each is written as a model file,
`<out-dir>/sigma_rel-<width>.safetensors` and its .json, that samples and scores like a snapshot;
the .json says in `posthoc_ema` how well the snapshots' profiles fit the width's (`fit_error`, the
relative L2 distance of the profiles; `mass`, the least-squares coefficients' sum before they are
rescaled to 1) and the width of the run's own per-step EMA at its end, the one its model file keeps
(`per_step_sigma_rel`, at `per_step_at` steps).

The teacher's snapshots lie in its store folder: `python -m stages.posthoc_ema --config
'{"sigma_rels": [0.05], "at": 1.0}' --phema <store>/teachers/<key>/phema --out-dir DIR` synthesises its EMA.
"""

import math
from pathlib import Path

import torch

from stages.config.power_ema import profile_stem
from stages.core import cli
from stages.files import checkpoints
from stages.training import posthoc_ema
from stages.training.ema import EMA

p = cli.parser(__doc__)
p.add_argument("--phema", required=True, help="the run's phema/ folder of power-EMA snapshots")
p.add_argument("--out-dir", required=True, help="folder for sigma_rel-<width>.safetensors (+ .json) per width")
args = p.parse_args()
cfg = cli.start(args, "posthoc_ema")

snapshots = posthoc_ema.read_snapshots(args.phema)
total = max(meta["steps"] for _, meta in snapshots)
step = round(cfg["at"] * total)
paths, fits = posthoc_ema.plan(snapshots, cfg["sigma_rels"], step)
if not all(math.isfinite(fit["fit_error"]) for _, fit in fits.values()):
    raise FloatingPointError(f"{args.phema}: a least-squares fit over the snapshots is not finite")
last = checkpoints.read_meta(paths[-1])
net, _ = checkpoints.load(paths[-1], which="ema")
buffers = {name for name, _ in net.named_buffers()}
states = posthoc_ema.synthesise(paths, {s: x for s, (x, _) in fits.items()}, buffers)
per_step = last["per_step_ema"]
per_step_sigma_rel = EMA(torch.nn.Module(), per_step["beta"], per_step["rampup"]).sigma_rel(total)
# what the syntheses are made from, beside the training's own `inputs` that every snapshot repeats
made_from = {"phema": str(args.phema), "snapshots": [{"path": str(p), "sha256": checkpoints.read_meta(p)["sha256"]}
                                                     for p in paths]}
run_meta = {k: v for k, v in last.items() if k not in ("format", "tf32", "sha256", "power_ema", "role")}
for sigma_rel, (_, fit) in fits.items():
    state = states[sigma_rel]
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(f"{args.phema}: the synthesis of sigma_rel {sigma_rel} has non-finite weights "
                                 f"({', '.join(bad[:5])}); a snapshot holds non-finite values: rerun its training")
    checkpoints.check_fits(net.state_dict(), state, f"the sigma_rel {sigma_rel} synthesis", args.phema)
    net.load_state_dict(state)
    out = Path(args.out_dir) / f"{profile_stem(sigma_rel)}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.save(out, ema=net, meta={**run_meta, "role": "posthoc-ema", "posthoc_config": cfg,
                                         "posthoc_ema": {**fit, "per_step_sigma_rel": per_step_sigma_rel,
                                                         "per_step_at": total},
                                         "posthoc_inputs": made_from})
    print(f"[posthoc_ema] sigma_rel {sigma_rel:.4f} (gamma {fit['gamma']:.3f}) at step {step} from "
          f"{fit['snapshots']} snapshots of profiles {fit['profiles']}: fit error {fit['fit_error']:.2e}, "
          f"mass {fit['mass']:.6f} -> {out}", flush=True)
print(f"[posthoc_ema] the run's per-step EMA at its end (step {total}) has sigma_rel {per_step_sigma_rel:.4f}",
      flush=True)
