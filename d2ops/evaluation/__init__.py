"""How good a model is, and what it finds.

- :mod:`~d2ops.evaluation.metrics`: COCO AP, per-class AP, F-beta, PR curves, confusion matrix;
- :mod:`~d2ops.evaluation.inference`: batch inference over a folder of images.
"""
