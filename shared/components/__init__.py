"""Fusion components, one shape each (ARCHITECTURE.md): the detection's features and a candidate's
stored features in, a raw similarity or None ("no evidence") out. A calibration then maps each raw
score to P(same individual) (`services.fusion.scoring`), and a fitted combination fuses them.

A component is named by what it compares: `body:<model>` for each body network (each model of the
ensemble is calibrated on its own), later `coat:*`, `antler`, `pose`. The evaluation builds its
similarity matrices with these same functions.
"""
from shared.components.base import AGGREGATIONS, aggregate, component_of
from shared.components.body import body_component, body_similarity, body_similarity_matrix

__all__ = ["AGGREGATIONS", "aggregate", "component_of", "body_component", "body_similarity",
           "body_similarity_matrix"]
