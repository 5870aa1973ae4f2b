"""Fusion components, one shape each (`base.Component`): Q query items and G gallery items of one kind of
features in, a (Q, G) matrix of raw similarities out, NaN where a pair gives no evidence. A calibration then
maps each raw score to P(same individual) (`shared.calibrated`), and a fitted combination fuses them.

A component is named by what it compares: `body:<model>` for each body network (each model of the
ensemble is calibrated on its own), `coat:colour`, `coat:markings`, `coat:pattern-xfeat`, `coat:pattern-rootsift`,
`pose`, `antler`. Importing this package registers them all; the fusion service and `deer-reid eval` both
score through `component(name)`.
"""
from shared.components import antler, body, coat, pose  # noqa: F401 - each registers its components
from shared.components.base import (
    AGGREGATIONS,
    Component,
    aggregate,
    best_over_queries,
    component,
    component_of,
    narrowed,
    reading,
    register,
    unregister,
)
from shared.components.body import body_component

__all__ = ["AGGREGATIONS", "Component", "aggregate", "best_over_queries", "body_component", "component", "component_of", "narrowed",
           "reading",
           "register", "unregister"]
