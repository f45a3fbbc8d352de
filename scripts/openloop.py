"""Open-loop world-model predictions of a run: `python scripts/openloop.py --logdir DIR [--png out.png]
[--video out.gif]`; prints the per-step errors against a copy-the-last-frame baseline as one JSON line."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dreamerv2_tf.openloop import main

if __name__ == "__main__":
    main()
