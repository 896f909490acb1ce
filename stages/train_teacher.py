"""Stage train_teacher: the teacher trained from scratch, EDM diffusion or MeanFlow
(stages/recipes/teacher.py), written as model.safetensors + model.json into the store."""

from stages.core import cli
from stages.recipes import teacher
from stages.training import loop, run

p = cli.add_state_args(cli.parser(__doc__))
cli.add_data_args(p)
p.add_argument("--out", required=True, help="model.safetensors to write")
p.add_argument("--key", required=True, help="store key of this teacher (provenance digest)")
args = p.parse_args()
cfg = cli.start(args, "train_teacher")
accelerator = loop.make_accelerator(args.tracking)
run.run(teacher.build(cfg, args, accelerator), args, cfg, accelerator, started=cli.started())
