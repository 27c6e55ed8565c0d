"""Datasets: validation before training, detectron2 registration, and the synthetic demo set.

- :mod:`~d2ops.data.validation`: COCO and VIA checks, one report of every problem with its fix;
- :mod:`~d2ops.data.overlap`: images shared between splits, by content;
- :mod:`~d2ops.data.registration`: splits registered with detectron2's DatasetCatalog (COCO, VIA, a carved val);
- :mod:`~d2ops.data.synthetic`: the shapes dataset ``make demo`` trains on.
"""
