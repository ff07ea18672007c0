"""Architecture ablations of decoder-only language models.

The model (`pipeline.model`) is pure PyTorch; training, tracking and sweeps live in their
own modules and import the model, never the other way round.
"""

__version__ = "0.1.0"
