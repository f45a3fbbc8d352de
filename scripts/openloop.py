"""Open-loop world-model predictions of a run: `python scripts/openloop.py --logdir DIR [--png out.png]
[--video out.gif] [--track pong]`; prints the per-step errors against a copy-the-last-frame baseline as
one JSON line (with --track pong, the ball-tracker table goes to stderr and to a JSON file)."""

import json
import os
import sys
from collections.abc import Sequence

from dreamerv2_tf import cli
from dreamerv2_tf import config as configlib
from dreamerv2_tf.tools import balltrack
from dreamerv2_tf.tools import openloop as ol

# Set before TensorFlow loads, which happens only inside ol.openloop (the modules above do not import it).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="openloop.py", description=ol.__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", required=True, help="training logdir with config.yaml and checkpoints/")
    parser.add_argument("--episodes", default=None,
                        help="directory of .npz episodes (default: the run's train episodes)")
    parser.add_argument("--context", type=int, default=5, help="observed frames before the open-loop part")
    parser.add_argument("--length", type=int, default=50, help="steps per sequence, context included")
    parser.add_argument("--count", type=int, default=4, help="number of sequences")
    parser.add_argument("--seed", type=int, default=0, help="chooses the sequences and the latent samples")
    parser.add_argument("--key", default="image", help="image observation to predict")
    parser.add_argument("--png", default=None, help="PNG strip (default: LOGDIR/openloop.png)")
    parser.add_argument("--video", default=None, help=".gif or .mp4 (default: LOGDIR/openloop.gif)")
    parser.add_argument("--every", type=int, default=5, help="PNG shows every n-th frame")
    parser.add_argument("--scale", type=int, default=3, help="video upscaling factor")
    parser.add_argument("--error_row", action="store_true", help="add an |error| row per sequence to the PNG")
    parser.add_argument("--show", type=int, default=None,
                        help=f"sequences in the PNG and the video (default: --count, at most {ol.SHOW_MAX})")
    parser.add_argument("--track", choices=balltrack.TRACKERS, default=None,
                        help="score the imagined ball against the true one in all --count sequences, per "
                             "imagined step, beside repeating the last observed frame")
    parser.add_argument("--track_out", default=None, help="JSON of the --track report "
                                                          "(default: LOGDIR/track_<game>.json)")
    args = parser.parse_args(argv)
    try:
        result = ol.openloop(args.logdir, args.episodes, args.context, args.length, args.count, args.seed,
                             args.key, args.png, args.video, args.every, args.scale, args.error_row,
                             args.show, args.track, args.track_out)
    except (configlib.ConfigError, FileNotFoundError, ValueError) as exc:
        cli.fail(str(exc))
    if args.track:  # for reading; stdout keeps the one JSON line
        print(balltrack.format_table(result["track"]), file=sys.stderr)
    print(json.dumps(result))
    sys.exit(0)


if __name__ == "__main__":
    main()
