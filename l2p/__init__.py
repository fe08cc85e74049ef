"""l2p: a research workbench for L2P (Latent-to-Pixel transfer), arXiv 2605.12013."""
__version__ = "0.1.0"
