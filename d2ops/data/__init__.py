"""Datasets: validation before training, detectron2 registration, and the synthetic demo set.

- :mod:`~d2ops.data.validation`: ``validate_dataset``, one report of every problem with its fix, across splits;
- :mod:`~d2ops.data.coco` and :mod:`~d2ops.data.via`: the checks of each format;
- :mod:`~d2ops.data.checks`: what they share (problems, split summaries, JSON and image files);
- :mod:`~d2ops.data.overlap`: images shared between splits, by content;
- :mod:`~d2ops.data.registration`: splits registered with detectron2's DatasetCatalog (COCO, VIA, a carved val);
- :mod:`~d2ops.data.synthetic`: the shapes dataset ``make demo`` trains on.
"""
