"""The Koh & Liang influence quantities and their result types."""

from .engine import Influence
from .explanation import Explanation, explain
from .fastif import FastIFIndex, FastIFScores, KNNPrefilter, fastif_up_loss
from .group import GroupInfluence
from .provenance import Provenance
from .results import InfluenceScores, ParamInfluence, PertScores, Ranking, SelfInfluence

__all__ = [
    "Explanation",
    "FastIFIndex",
    "FastIFScores",
    "GroupInfluence",
    "Influence",
    "InfluenceScores",
    "KNNPrefilter",
    "ParamInfluence",
    "PertScores",
    "Provenance",
    "Ranking",
    "SelfInfluence",
    "explain",
    "fastif_up_loss",
]
