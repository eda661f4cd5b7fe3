"""SSD4Rec on TorchRec: a bidirectional Mamba-2/SSD encoder over packed, variable-length item histories."""

__version__ = "0.1.0"
