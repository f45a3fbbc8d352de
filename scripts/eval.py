"""Evaluate a run: `python scripts/eval.py --logdir DIR --episodes N [--video out.mp4]`."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dreamerv2_tf.loop.evaluate import main

if __name__ == "__main__":
    main()
