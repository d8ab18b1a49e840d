"""Influence functions (training-data attribution) with EK-FAC, K-FAC, diagonal and identity curvature."""

from influence.analyzer import Analyzer
from influence.arguments import STRATEGIES, FactorArguments, ScoreArguments
from influence.errors import InfluenceError
from influence.task import Task

__all__ = ["Analyzer", "FactorArguments", "InfluenceError", "STRATEGIES", "ScoreArguments", "Task"]
