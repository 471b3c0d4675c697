"""r1ray: GRPO for reasoning models as a Ray actor system."""
__version__ = "0.1.0"
