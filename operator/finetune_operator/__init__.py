"""finetune-operator control plane: kopf handlers over pure decision logic. Never imports torch."""

__version__ = "0.1.0"
