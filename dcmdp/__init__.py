"""dcmdp: discrepancy-constrained RL post-training (DC-GRPO) across heterogeneous engines."""

__version__ = "0.1.0"
