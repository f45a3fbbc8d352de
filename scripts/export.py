"""Export a run's policy as a SavedModel: `python scripts/export.py --logdir DIR --out MODEL_DIR`."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dreamerv2_tf.tools.export import main

if __name__ == "__main__":
    main()
