"""Stage import_teacher: an official EDM teacher snapshot or EDM2 post-hoc EMA pickle (.pkl, read
without running its code) -> our model.safetensors (EMA weights under `ema.`) + model.json
(DDPM++ or EDM2 architecture, EDM preconditioning). The guide network of ECD's autoguidance is
imported by the same stage (it is a teacher of the same task)."""

from stages import networks
from stages.core import cli
from stages.files import atomic, checkpoints, edm2_import, edm_import

p = cli.parser(__doc__)
p.add_argument("--pickle", required=True, help="the EDM snapshot, e.g. assets/edm-cifar10-32x32-uncond-vp.pkl")
p.add_argument("--out", required=True, help="model.safetensors to write")
p.add_argument("--key", required=True, help="store key of this teacher (provenance digest)")
args = p.parse_args()
cfg = cli.start(args, "import_teacher")

if cfg["network"]["kind"] == "edm2":
    # EDM2's post-hoc EMA pickles: the row's network (a preset, overrides) must be the pickle's
    imported = edm2_import.load_edm2(args.pickle)
    net, architecture, sigma_data = imported.net, imported.architecture, imported.sigma_data
    info = {**imported.info, "encoder": imported.encoder}
    expected = networks.architecture(cfg["network"], architecture["in_channels"], architecture["resolution"],
                                     architecture["dropout"])
    edm_import.check_network_config(architecture, expected, args.pickle)
    edm2_import.check_encoder(imported.encoder, cfg.get("latents"), args.pickle)
else:
    net, architecture, sigma_data, info = edm_import.load_edm_teacher(args.pickle)
    edm_import.check_network_config(architecture, cfg["network"], args.pickle)
if abs(sigma_data - cfg["sigma_data"]) > 1e-12:
    raise ValueError(f"{args.pickle}: snapshot sigma_data {sigma_data} != config sigma_data {cfg['sigma_data']}")
print(f"[import_teacher] {args.pickle}: {info['tensors']} tensors, {info['parameters']:,} parameters, "
      f"architecture {architecture}", flush=True)
checkpoints.save(args.out, ema=net, meta={
    "role": "teacher", "key": args.key, "architecture": architecture, "precond": "edm",
    "sigma_data": sigma_data, "sigma_min": cfg["sigma_min"], "sigma_max": cfg["sigma_max"],
    "time": "sigma", "config": cfg, "source": "import", "imported": info,
    "inputs": {"pickle": {"path": args.pickle, "sha256": atomic.sha256_file(args.pickle),
                          "url": cfg["teacher"].get("url")}},
})
print(f"[import_teacher] wrote {args.out}", flush=True)
