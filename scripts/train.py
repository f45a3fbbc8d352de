"""Train DreamerV2, e.g. `python scripts/train.py --configs defaults atari --task atari_pong`.

Run with --help for the named configs and how to override keys.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dreamerv2_tf.loop.training import main

if __name__ == "__main__":
    main()
