#!/usr/bin/env python
"""Train EAVL for referring image segmentation, from one CPU to many GPUs.

With no arguments (or ``--demo``) this runs the embedded demo: it generates the synthetic
referring set once into a cache folder, trains the tiny model on the CPU for about ten
minutes, evaluates it and writes ``runs/demo/predictions.png``::

    python examples/train_eavl.py

Otherwise the model's recipe applies (``--recipe``: ``paper-finetune`` for Swin-B + BERT-base,
the paper's Adam lr 5e-5 with poly decay; ``scratch-small`` for the tiny model)::

    python examples/train_eavl.py --data-root data --dataset refcoco --output-dir runs/refcoco --pretrained
    torchrun --nproc_per_node=8 examples/train_eavl.py --data-root data --dataset refcoco \\
        --output-dir runs/refcoco --pretrained --amp bf16
    python examples/train_eavl.py ... --resume          # continue runs/refcoco/last

The same command is ``vlaligner train ...`` from a plain install. Outputs in ``--output-dir``:
``last/`` and ``best/`` (each an ``EAVL.from_pretrained`` folder plus
``training_state.{safetensors,json}``), ``train.log``, ``losses.jsonl``, ``metrics.jsonl``,
``curves.png``, ``predictions.png``, ``run_config.json``. See docs/training.md; the loop is
``vlaligner.training.Trainer``.
"""

import sys

from vlaligner.training import train_main

if __name__ == "__main__":
    sys.exit(train_main())
