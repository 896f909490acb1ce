"""Stage train_latent_vgg: the latent VGG16 of E-LatentLPIPS trained as a classifier on the encoded
latents, with its held-out accuracy (stages/recipes/latent_vgg.py)."""

from stages.core import cli
from stages.recipes import latent_vgg
from stages.training import loop, run

p = cli.add_state_args(cli.parser(__doc__))
p.add_argument("--manifest", required=True, help="the encoded dataset's manifest (latent_manifest)")
p.add_argument("--verify", choices=["full", "fast"], default="full",
               help="check every shard against the manifest: size and sha256 (full) or size only (fast)")
p.add_argument("--out", required=True, help="model.safetensors to write")
p.add_argument("--accuracy", required=True, help="accuracy.json to write")
args = p.parse_args()
cfg = cli.start(args, "train_latent_vgg")
accelerator = loop.make_accelerator(args.tracking)
run.run(latent_vgg.build(cfg, args, accelerator), args, cfg, accelerator, started=cli.started())
