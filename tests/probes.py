"""A test-side Lightning callback that records what the CLI built, added to a run from the command line:

    --trainer.callbacks+=probes.Built --trainer.callbacks.name NAME

(Not in conftest.py: importing Lightning there, before pytest's logging capture is set up, would make Lightning
keep its log records from pytest's `caplog`.)
"""

from types import SimpleNamespace

from lightning.pytorch import Callback


class Built(Callback):
    """What the CLI built for a fit, kept in `Built.fits[name]` when training ends: the trainer's loggers and
    callbacks (class names), whether a WandbLogger was told `offline`, the model's weights' shapes, the steps.
    Added by `--trainer.callbacks+=probes.Built --trainer.callbacks.name NAME`.

    Args:
        name: The key in `Built.fits`.
    """

    fits: dict[str, SimpleNamespace] = {}

    def __init__(self, name: str):
        self.name = name

    def on_train_end(self, trainer, pl_module) -> None:
        Built.fits[self.name] = SimpleNamespace(
            loggers=[type(logger).__name__ for logger in trainer.loggers],
            wandb_offline=[logger._offline for logger in trainer.loggers if hasattr(logger, "_offline")],
            callbacks=[type(callback).__name__ for callback in trainer.callbacks],
            shapes={name: tuple(tensor.shape) for name, tensor in pl_module.state_dict().items()},
            global_step=trainer.global_step)  # fmt: skip
