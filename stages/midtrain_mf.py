"""Stage midtrain_mf: Consistency Mid-Training for the average-velocity flow map, CMT-MF
(stages/recipes/midtrain_mf.py, docs/method.md#meanflow): a student u(z, r, t) regresses the
average velocity between pairs of points of the teacher's trajectories, in flow-matching time."""

from stages.core import cli
from stages.recipes import midtrain_mf
from stages.training import loop, run

p = cli.add_trajectory_args(cli.add_state_args(cli.parser(__doc__)))
p.add_argument("--teacher", required=True, help="teacher model.safetensors (architecture, sigma_data, spot check)")
p.add_argument("--out", required=True, help="model.safetensors to write")
args = p.parse_args()
cfg = cli.start(args, "midtrain_mf")
accelerator = loop.make_accelerator(args.tracking)
run.run(midtrain_mf.build(cfg, args, accelerator), args, cfg, accelerator, started=cli.started())
