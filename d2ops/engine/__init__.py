"""Training with detectron2.

- :mod:`~d2ops.engine.d2config`: detectron2 configs built from the experiment, and their checks;
- :mod:`~d2ops.engine.trainer`: the trainer, its Reporter writer, ``train()`` (resume, reuse, launch);
- :mod:`~d2ops.engine.checkpoints`: crash-safe checkpoints, the run record, the mirror on S3;
- :mod:`~d2ops.engine.distributed`: the DDP / multi-node launch plan and its event relay.
"""
