"""The Koh & Liang influence quantities and their result types."""

from .engine import Influence
from .group import GroupInfluence
from .results import InfluenceScores, ParamInfluence, PertScores, Ranking, SelfInfluence

__all__ = ["GroupInfluence", "Influence", "InfluenceScores", "ParamInfluence", "PertScores", "Ranking", "SelfInfluence"]
