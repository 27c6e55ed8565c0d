"""Serving a d2ops model: one detector API behind every front end.

- :mod:`~d2ops.serving.core`: settings, the detector API (decode -> predict -> encode), micro-batcher, hot swap;
- :mod:`~d2ops.serving.http`: ``d2ops serve``, the FastAPI app (CVAT and TorchServe contracts);
- :mod:`~d2ops.serving.formats` and :mod:`~d2ops.serving.payloads`: image decoding and request bodies;
- :mod:`~d2ops.serving.nuclio`: the CVAT serverless (nuclio) function and its export;
- :mod:`~d2ops.serving.clearml_engine`: the clearml-serving custom engine.

Nothing here imports training, checkpoints, S3 transfers or ClearML: a server loads a bundle alone.
"""
