"""The register step as a ClearML task script.

Bundle the model and register it in ClearML; publish it only if the quality gate passes.

An example of using the d2ops library: all logic is in d2ops.pipeline.steps.run_register.

    python tasks/register.py --config configs/smoke.yaml --offline          # no server
    python tasks/register.py --config configs/smoke.yaml                    # here, with a server
    python tasks/register.py --config configs/smoke.yaml --remote --queue Q # on a clearml-agent
"""

import sys

from d2ops.cli.steps import step_main

if __name__ == "__main__":
    sys.exit(step_main("register"))
