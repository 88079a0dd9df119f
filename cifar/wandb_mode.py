"""Online or offline: W&B's own settings decide, except where W&B would prompt for a key or fail."""

import os

import wandb
from lightning.pytorch.utilities import rank_zero_info

from cifar.errors import UserError

# W&B online with no reachable server waits 90 s (its default) before failing; 30 s is plenty to connect.
INIT_TIMEOUT = "30"


def offline_without_a_key(init_args) -> None:
    """Let W&B's own settings decide whether a WandbLogger's run is online, except where W&B would prompt for
    a key or fail: then log offline, and say how to upload the run.

    `offline: true` or a `mode` in the config wins. Otherwise W&B's conventions decide: WANDB_MODE, then
    `wandb offline` / `wandb online`, then online. Online needs an API key (`wandb login` or WANDB_API_KEY);
    with none configured, this sets the logger's `mode` (an argument of `wandb.init`) to offline.
    """
    os.environ.setdefault("WANDB_INIT_TIMEOUT", INIT_TIMEOUT)  # before wandb.setup() reads the environment
    if init_args.get("offline") and init_args.get("log_model"):  # WandbLogger refuses the pair, in a traceback
        raise UserError("log_model with offline: true: Lightning's WandbLogger refuses to log checkpoints offline. Drop "
                        "offline (with no API key configured the run logs offline anyway, checkpoints included, for "
                        "`wandb sync`) or log_model")  # fmt: skip
    if init_args.get("offline") or init_args.get("mode"):
        return
    if (os.environ.get("WANDB_MODE") or wandb.setup().settings.mode) != "online":
        return
    if not wandb.login(prompt=False, verify=False):
        init_args.mode = "offline"
        rank_zero_info("W&B: no API key configured (`wandb login` or WANDB_API_KEY), so this run logs offline; "
                       "upload it later with `wandb sync <run dir>/wandb`")  # fmt: skip
