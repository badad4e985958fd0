"""structalign: structure-coherent face alignment (L-GRN) with fused graph and relative-location ops."""

__version__ = "0.1.0"
