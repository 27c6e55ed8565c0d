"""The model: :class:`~d2ops.model.bundle.ModelBundle` (files, checks, version, zip),
:class:`~d2ops.model.detector.Detector` (batched detectron2 inference) and model references
(:mod:`d2ops.model.source`: folder, zip, ``s3://``, ClearML).

Submodules are imported on use, so ``import d2ops.model.bundle`` stays free of torch and detectron2.
"""
