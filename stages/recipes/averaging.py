"""The EMA a training stage's `ema` section asks for: the per-step EMA, and with `kind: power` the
power-function profiles beside it, snapshotted where stages/config/power_ema.py says."""

from stages.config import power_ema
from stages.training.ema import EMA, PowerEMA


def ema_of(net, section, total_steps):
    """The EMA of `net` (a copy of its weights now) over a run of `total_steps` steps."""
    if power_ema.is_power(section):
        return PowerEMA(net, section["beta"], section.get("rampup"), section["sigma_rels"],
                        power_ema.snapshots(section, total_steps))
    return EMA(net, section["beta"], section.get("rampup"))
