"""Stage midtrain: Consistency Mid-Training, CMT-CM (stages/recipes/midtrain.py,
docs/method.md#cmt-cm): the teacher's consistency student maps every point of the teacher's
trajectories to their final state."""

from stages.core import cli
from stages.recipes import midtrain
from stages.training import loop, run

p = cli.add_trajectory_args(cli.add_state_args(cli.parser(__doc__)), manifest_required=False)
p.add_argument("--teacher", required=True, help="teacher model.safetensors (the initialisation)")
p.add_argument("--out", required=True, help="model.safetensors to write")
p.add_argument("--latent-vgg", default=None, help="distance elatentlpips: the latent VGG16 (train_latent_vgg)")
args = p.parse_args()
cfg = cli.start(args, "midtrain")
accelerator = loop.make_accelerator(args.tracking)
run.run(midtrain.build(cfg, args, accelerator), args, cfg, accelerator, started=cli.started())
