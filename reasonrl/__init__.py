"""reasonrl: a kernel-centric trainer for reasoning by reinforcement learning."""
__version__ = "0.1.0"
