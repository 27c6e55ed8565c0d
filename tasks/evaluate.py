"""The evaluate step as a ClearML task script.

COCO AP (overall, per class), precision/recall/F2, PR curves and a confusion matrix.

An example of using the d2ops library: all logic is in d2ops.pipeline.steps.run_evaluate.

    python tasks/evaluate.py --config configs/smoke.yaml --offline          # no server
    python tasks/evaluate.py --config configs/smoke.yaml                    # here, with a server
    python tasks/evaluate.py --config configs/smoke.yaml --remote --queue Q # on a clearml-agent
"""

import sys

from d2ops.cli.steps import step_main

if __name__ == "__main__":
    sys.exit(step_main("evaluate"))
