"""gpu_ann: train a YouTube-style candidate generator on user-item ratings, batches built on the GPU.

Importing the package needs neither a GPU nor CuPy; the CUDA backend is loaded only when asked for.
"""

__version__ = "0.1.0"

from gpu_ann.backend import BackendUnavailable, get_backend
from gpu_ann.data import DataError, RatingsTable
from gpu_ann.data.readers import load_bundled_anime, read_ratings

__all__ = [
    "BackendUnavailable",
    "DataError",
    "RatingsTable",
    "__version__",
    "get_backend",
    "load_bundled_anime",
    "read_ratings",
]
