#!/usr/bin/env python
"""Evaluate an EAVL checkpoint: oIoU, mIoU and Precision@0.5-0.9 per split, and query diversity.

    python examples/evaluate.py --checkpoint runs/refcoco/best --data-root data \\
        --dataset refcoco --split val testA testB
    python examples/evaluate.py --checkpoint runs/demo/best          # the demo's synthetic set

Predictions are compared with the ground truth at the original image size (CRIS / VLT);
``--resized`` compares at the input size instead (LAVT's convention). Without ``--data-root``
the data settings of the training run (read from the checkpoint's ``training_state.json``)
are used, and else the synthetic set in the cache folder. Prints a table and writes
``metrics.json`` next to the checkpoint. Runs under ``torchrun`` too. The same command is
``vlaligner evaluate ...`` from a plain install; the code is ``vlaligner.training.commands``.
"""

import sys

from vlaligner.training import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
