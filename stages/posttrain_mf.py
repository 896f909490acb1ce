"""Stage posttrain_mf: MeanFlow post-training from one initialisation, the CMT-MF mid-trained model
or random weights, with EMA snapshots at fractions of the budget (stages/recipes/posttrain_mf.py)."""

from stages.core import cli
from stages.recipes import posttrain_mf
from stages.training import loop, run

p = cli.add_state_args(cli.parser(__doc__))
p.add_argument("--init", required=True, choices=["cmt", "random"])
p.add_argument("--init-model", required=True,
               help="model.safetensors to start from; for --init random the teacher (architecture only)")
cli.add_data_args(p)
p.add_argument("--teacher", default=None,
               help="posttrain_mf.target teacher (MeanFlow distillation): the teacher's model.safetensors")
p.add_argument("--out", required=True, help="final model.safetensors")
p.add_argument("--snapshots", required=True, help="folder for the EMA snapshots p000.safetensors, ...")
args = p.parse_args()
cfg = cli.start(args, f"posttrain_mf:{args.init}")
accelerator = loop.make_accelerator(args.tracking)
run.run(posttrain_mf.build(cfg, args, accelerator), args, cfg, accelerator, started=cli.started())
