"""finetune-worker: the data plane that runs inside training and export pods."""

__version__ = "0.1.0"
