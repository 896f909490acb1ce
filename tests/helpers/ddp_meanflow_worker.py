"""One rank of a 2-process CPU (gloo) MeanFlow step through loop.fit, launched by torchrun from
tests/test_meanflow_ddp.py. The JVP runs on the bare module, the graph forward on the DDP wrapper;
each rank writes its gradients after the all-reduce and, for rank 0, the gradients of the same
two half-batches computed in this one process without DDP by the one-process route (a single JVP
with a graph): the reference."""

import copy
import sys
from pathlib import Path

import torch

from stages import networks
from stages.core import rng
from stages.method import meanflow
from stages.networks.average_velocity import AverageVelocity
from stages.training import loop
from stages.training.ema import EMA

torch.set_num_threads(1)

out = Path(sys.argv[1])
SEED, GLOBAL_BATCH = 3, 8
OPT = {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "schedule": "constant"}

accelerator = loop.make_accelerator()
world, rank = accelerator.num_processes, accelerator.process_index
assert world == 2, f"expected 2 processes, got {world}"
torch.manual_seed(0)
net = AverageVelocity(networks.build({
    "kind": "small_unet", "in_channels": 1, "resolution": 4, "channels": 8, "channel_mult": [1, 2],
    "num_blocks": 1, "dropout": 0.2, "dual_time": True}))
with torch.no_grad():  # non-zero output layers, so every parameter gets a gradient
    for prm in net.parameters():
        prm.add_(0.05 * torch.randn_like(prm))
reference = copy.deepcopy(net)
data = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
local = GLOBAL_BATCH // world


def half_batch_loss(u, bare, step, k):
    g = rng.generator(SEED, step, k, "meanflow-batch")
    x = data[torch.randint(len(data), (local,), generator=g)]
    return meanflow.meanflow_loss(u, x, g, ratio_r_neq_t=0.5, jvp_u=bare)


ema = EMA(net, 0.9)
optimizer = loop.build_optimizer(net.parameters(), OPT)
ddp, optimizer = accelerator.prepare(net, optimizer)
assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel), type(ddp)
bare = accelerator.unwrap_model(ddp)
loop.fit(stage="ddp-check", accelerator=accelerator, net=ddp, ema=ema, optimizer=optimizer,
             opt_cfg=OPT, total_steps=1, batch=GLOBAL_BATCH, seed=SEED,
             loss_fn=lambda step, part: half_batch_loss(ddp, bare, step, rank))
torch.save({n: p.grad.clone() for n, p in bare.named_parameters()}, out / f"grads_rank{rank}.pt")

if rank == 0:  # the same step without DDP: mean over ranks of each rank's mean loss
    reference.train()
    total = 0
    for k in range(world):
        torch.manual_seed(rng.fold(SEED, 0, k, "dropout"))  # the dropout seed fit gives rank k
        # the one-process route: a single JVP with a graph
        total = total + half_batch_loss(reference, None, 0, k).mean() / world
    total.backward()
    torch.save({n: p.grad.clone() for n, p in reference.named_parameters()}, out / "grads_reference.pt")
accelerator.wait_for_everyone()
