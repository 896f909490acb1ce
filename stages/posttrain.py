"""Stage posttrain: consistency post-training (ECT, ECD or the ImageNet-512 code's ECT) from one
initialisation, with EMA snapshots at fractions of the budget (stages/recipes/posttrain.py)."""

from stages.core import cli
from stages.recipes import posttrain
from stages.training import loop, run

p = cli.add_state_args(cli.parser(__doc__))
p.add_argument("--init", required=True, choices=["cmt", "teacher", "random", "baseline"],
               help="baseline = vanilla ECT from the teacher (the row's `baseline` settings)")
p.add_argument("--init-model", required=True,
               help="model.safetensors to start from; for --init random only its architecture is used")
cli.add_data_args(p, dataset_required=True)
p.add_argument("--teacher", default=None, help="method ecd: the teacher model.safetensors (EMA, EDM preconditioning)")
p.add_argument("--guide", default=None, help="method ecd with autoguidance: the guide model.safetensors")
p.add_argument("--out", required=True, help="final model.safetensors")
p.add_argument("--snapshots", required=True, help="folder for the EMA snapshots p000.safetensors, ...")
args = p.parse_args()
cfg = cli.start(args, f"posttrain:{args.init}")
accelerator = loop.make_accelerator(args.tracking)
run.run(posttrain.build(cfg, args, accelerator), args, cfg, accelerator, started=cli.started())
