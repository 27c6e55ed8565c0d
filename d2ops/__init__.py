"""d2ops: train, evaluate and ship detectron2 detectors on ClearML."""

__version__ = "0.1.0"
