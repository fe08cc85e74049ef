"""l2p: a research workbench for L2P (Latent-to-Pixel transfer), arXiv 2605.12013."""
import os as _os

__version__ = "0.1.0"

if _os.environ.get("L2P_HEADLESS"):
    # Under papermill, tqdm.auto draws widgets that freeze in exported reports: use plain text bars.
    import tqdm.auto as _tqdm_auto
    import tqdm.std as _tqdm_std

    _tqdm_auto.tqdm = _tqdm_std.tqdm
