"""gpu_ann: train a YouTube-style candidate generator on user-item ratings, batches built on the GPU.

The stages, each importable on its own:

=================  ====================================================================
read               :func:`read_ratings`, :func:`load_bundled_anime` -> :class:`RatingsTable`
split              :func:`make_split` (protocols), :func:`random_split` -> :class:`Splits`
build the matrix   :class:`InteractionMatrix` (validated CSR on a backend, :func:`get_backend`)
load batches       :class:`BatchLoader` (device-built ``(X, y)`` for any torch loop)
build the model    :class:`CandidateGenerator`
train              :func:`train` with a :class:`TrainConfig`
evaluate           :func:`evaluate_run`
recommend          :class:`Recommender`
=================  ====================================================================

Importing the package needs neither a GPU nor CuPy; the CUDA backend is loaded only when asked for.
"""

__version__ = "0.1.0"

from gpu_ann.backend import BackendUnavailable, get_backend
from gpu_ann.baselines import EASE, Biases, Popularity
from gpu_ann.data import DataError, RatingsTable
from gpu_ann.data.readers import load_bundled_anime, read_ratings
from gpu_ann.evaluate import evaluate_run
from gpu_ann.loader import Batch, BatchLoader
from gpu_ann.matrix import InteractionMatrix, MalformedMatrix
from gpu_ann.model import CandidateGenerator
from gpu_ann.recommend import Recommender
from gpu_ann.splits import Samples, Splits, make_split, random_split
from gpu_ann.training import TrainConfig, TrainResult, train

__all__ = [
    "BackendUnavailable",
    "Biases",
    "EASE",
    "Popularity",
    "Batch",
    "BatchLoader",
    "CandidateGenerator",
    "DataError",
    "InteractionMatrix",
    "MalformedMatrix",
    "RatingsTable",
    "Recommender",
    "Samples",
    "Splits",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "evaluate_run",
    "get_backend",
    "load_bundled_anime",
    "make_split",
    "random_split",
    "read_ratings",
    "train",
]
