"""Architecture search on the measured Pareto front: spaces, a latency predictor, the search.

``archopt.search.space`` (declarative spaces over archopt's operators),
``archopt.search.spaces`` (the built-in ones) and ``archopt.search.predictor`` (nn-Meter-style
per-layer latency table) need only torch. ``archopt.search.loop`` runs the search:
``propose`` (NSGA-II from pymoo, or random genomes), ``evaluate`` (train and measure a
candidate; calibration and reference point), ``records`` (``records.jsonl``, resumable),
``result`` (``search.json``) and ``report`` (the hypervolume, the table and the plots). pymoo
is imported when a search runs, so ``import archopt`` never needs it.
"""

from archopt.search.predictor import LatencyPredictor, LatencyTable, check_predictions
from archopt.search.space import Candidate, SearchSpace
from archopt.search.spaces import SPACES, get_space

__all__ = [
    "SPACES",
    "Candidate",
    "LatencyPredictor",
    "LatencyTable",
    "SearchSpace",
    "check_predictions",
    "get_space",
]
