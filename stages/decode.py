"""Stage decode: a latent row's samples (latents_<steps>step_r<range>, the networks' whitened latents)
through the VAE decoder to uint8 images (images_<steps>step_r<range>, [N, 3, 8h, 8w]), the file the
fid and report stages read; the classes (labels_r<range>) are copied as they are. Decoding follows
EDM2: undo the whitening, decode, clamp to [0, 1], truncate x 255 to uint8 (latent_codec.py)."""

import io
import time

import numpy as np
import torch

from stages.files import atomic
from stages.networks import latent_codec
from stages.runtime import cli

p = cli.parser(__doc__)
p.add_argument("--samples", required=True, help="the sample stage's .npz of latents")
p.add_argument("--out", required=True)
args = p.parse_args()
cfg = cli.start(args, "decode")

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
codec = latent_codec.build_codec(cfg["vae"], cfg.get("folder"), cfg["latents"], batch_size=cfg["batch"]).to(device)
t0, arrays = time.perf_counter(), {}
with np.load(args.samples) as data:
    names = [k for k in data.files if k.startswith("latents_")]
    if not names:
        raise ValueError(f"{args.samples}: no latents_* arrays; not the samples of a latent row's model "
                         "(rerun the sample rule with this row's config)")
    for name in data.files:
        if name.startswith("latents_"):
            latents = torch.from_numpy(data[name])
            if not torch.isfinite(latents).all():
                raise FloatingPointError(f"{args.samples}: {name} holds non-finite latents")
            images = [codec.decode(chunk.to(device)).cpu() for chunk in latents.split(cfg["batch"])]
            arrays["images_" + name[len("latents_"):]] = torch.cat(images).numpy()
        else:
            arrays[name] = data[name]
buf = io.BytesIO()
np.savez(buf, **arrays)
atomic.write_bytes(args.out, buf.getvalue())
n = sum(len(a) for k, a in arrays.items() if k.startswith("images_"))
print(f"[decode] {n} images {tuple(next(a for k, a in arrays.items() if k.startswith('images_')).shape[1:])} "
      f"from {args.samples} in {time.perf_counter() - t0:.1f}s -> {args.out}", flush=True)
