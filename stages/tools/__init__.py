"""Commands people run beside the workflow (the store command, `cmt-store`); the top layer: they may
use every package below, and nothing imports them."""
