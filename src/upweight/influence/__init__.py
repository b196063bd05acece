"""The Koh & Liang influence quantities and their result types."""

from .engine import Influence
from .results import InfluenceScores, ParamInfluence, PertScores, Ranking, SelfInfluence

__all__ = ["Influence", "InfluenceScores", "ParamInfluence", "PertScores", "Ranking", "SelfInfluence"]
