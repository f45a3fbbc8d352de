"""The 55-game Atari benchmark as one training command per (game, seed).

Examples:
  python scripts/sweep.py > commands.txt                      # 55 games x 5 seeds, one command per line
  python scripts/sweep.py --format slurm --out sweep.sbatch   # SLURM job array; then: sbatch sweep.sbatch
  python scripts/sweep.py --games pong breakout --seeds 0 --launch --workers 2 --devices 0,1
  python scripts/sweep.py --seeds 0 1 2 -- --steps 1e7        # flags after -- go to every train.py

Every run writes to ROOT/atari_<game>/seed<S>; running a command again resumes that run
from its logdir, so re-submitting the same array (or re-launching) continues a sweep.

With --launch, runs that share a GPU (more workers than --devices) start with --gpu_memory growth,
since TensorFlow would otherwise reserve the whole GPU for the first of them.
"""

from __future__ import annotations

import argparse
import difflib
import os
import queue
import shlex
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dreamerv2_tf.cli import ArgumentParser
from dreamerv2_tf.tools.scores import GAMES

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = "scripts/train.py"
# Flags the sweep sets itself for every run; extra flags must not override them.
OWN_FLAGS = ("--configs", "--task", "--seed", "--logdir")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1:]
    parser = ArgumentParser(
        prog="sweep.py",
        description="Write (or --launch) one scripts/train.py command per (game, seed) of the 55-game Atari "
                    "benchmark: python scripts/train.py --configs defaults atari --task atari_<game> --seed S "
                    "--logdir ROOT/atari_<game>/seed<S> [EXTRA].",
        epilog="Flags after a bare -- (e.g. -- --steps 1e7 --rssm.deter 200) are appended to every command. "
               "Commands are ordered seed by seed, so the first seed of every game finishes first.",
    )
    parser.add_argument("--games", nargs="+", metavar="GAME",
                        help="subset of games: task names (atari_pong) or short names (pong); default: all 55")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                        help="seeds per game (default: 0 1 2 3 4, the paper's 5 seeds)")
    parser.add_argument("--configs", nargs="+", default=["defaults", "atari"],
                        help="named configs for train.py (default: defaults atari)")
    parser.add_argument("--root", default="logdir",
                        help="parent of the run logdirs; the default matches train.py's own logdir/<task>/seed<S> "
                             "(default: %(default)s)")
    parser.add_argument("--python", default="python", help="Python executable in the commands (default: %(default)s)")
    parser.add_argument("--format", default="list", choices=("list", "slurm"),
                        help="list: one command per line; slurm: an sbatch job-array script (default: %(default)s)")
    parser.add_argument("--out", help="write to this file instead of stdout")
    local = parser.add_argument_group("local process pool (--launch)")
    local.add_argument("--launch", action="store_true", help="run the commands here instead of printing them")
    local.add_argument("--workers", type=int, default=1, help="runs at the same time (default: %(default)s)")
    local.add_argument("--devices", default="",
                       help="comma-separated GPU ids handed out to worker slots via CUDA_VISIBLE_DEVICES, "
                            "e.g. 0,1 (default: leave it unset); with more workers than devices the runs "
                            "share GPUs and start with --gpu_memory growth")
    slurm = parser.add_argument_group("SLURM job array (--format slurm)")
    slurm.add_argument("--job-name", default="dreamerv2", help="job name (default: %(default)s)")
    slurm.add_argument("--partition", default="", help="partition (default: the cluster's default)")
    slurm.add_argument("--account", default="", help="account to charge (default: none)")
    slurm.add_argument("--time", default="7-00:00:00",
                       help="time limit per run; an interrupted run resumes when resubmitted (default: %(default)s)")
    slurm.add_argument("--gpus-per-run", type=int, default=1, help="GPUs per array task (default: %(default)s)")
    slurm.add_argument("--cpus", type=int, default=4, help="CPU cores per array task (default: %(default)s)")
    slurm.add_argument("--mem", default="32G", help="memory per array task (default: %(default)s)")
    slurm.add_argument("--max-parallel", type=int, default=0,
                       help="array tasks running at once, the %%N of --array (default: no limit)")
    slurm.add_argument("--workdir", default=str(REPO),
                       help="directory the array tasks cd into (default: this checkout)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.gpus_per_run < 0 or args.cpus < 1 or args.max_parallel < 0:
        parser.error("--gpus-per-run and --max-parallel must be >= 0 and --cpus >= 1")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds has duplicates: {' '.join(map(str, args.seeds))}")
    if args.launch and args.format != "list":
        parser.error("--launch runs the commands itself; it cannot be combined with --format slurm")
    try:
        args.games = resolve_games(args.games)
        check_extra(extra)
    except ValueError as exc:
        parser.error(str(exc))
    return args, extra


def resolve_games(names: list[str] | None) -> list[str]:
    """Task names in benchmark order; accepts atari_james_bond, james_bond, JamesBond or jamesbond."""
    if not names:
        return list(GAMES)
    by_key = {_game_key(task): task for task in GAMES}
    tasks = []
    for name in names:
        task = by_key.get(_game_key(name))
        if task is None:
            shorts = [game.removeprefix("atari_") for game in GAMES]
            close = difflib.get_close_matches(name.lower().removeprefix("atari_"), shorts, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown game '{name}'{hint} (the 55 games of paper Table K1, e.g. pong, james_bond)")
        if task not in tasks:
            tasks.append(task)
    return sorted(tasks, key=GAMES.index)


def _game_key(name: str) -> str:
    """'atari_james_bond', 'JamesBond' and 'jamesbond' all become 'jamesbond'."""
    return "".join(char for char in name.lower().removeprefix("atari_") if char.isalnum())


def check_extra(extra: list[str]) -> None:
    if extra and not extra[0].startswith("--"):
        raise ValueError(f"arguments after -- must be train.py flags like --steps 1e7, got '{extra[0]}'")
    for token in extra:
        flag = token.split("=", 1)[0]
        if flag in OWN_FLAGS:
            raise ValueError(f"{flag} is set by the sweep for every run; use --games, --seeds, --configs or --root")


def commands(args: argparse.Namespace, extra: list[str]) -> list[list[str]]:
    """One argv per (seed, game), seed-major."""
    root = args.root.rstrip("/") or "/"
    out = []
    for seed in args.seeds:
        for task in args.games:
            out.append([
                args.python, TRAIN_SCRIPT, "--configs", *args.configs, "--task", task,
                "--seed", str(seed), "--logdir", f"{root}/{task}/seed{seed}", *extra,
            ])
    return out


def command_list(cmds: list[list[str]]) -> str:
    return "".join(shlex.join(cmd) + "\n" for cmd in cmds)


def slurm_script(args: argparse.Namespace, cmds: list[list[str]]) -> str:
    """A self-contained sbatch script whose array task i runs command i."""
    workdir = Path(args.workdir).expanduser().resolve()
    logs = (workdir / args.root / "slurm").resolve()
    limit = f"%{args.max_parallel}" if args.max_parallel else ""
    lines = [
        "#!/bin/bash",
        f"# DreamerV2 Atari sweep: {len(args.games)} games x {len(args.seeds)} seeds = {len(cmds)} runs.",
        "# Submit with: sbatch THIS_FILE. Resubmitting continues unfinished runs from their logdirs.",
        f"# Logs of each array task go to {logs}/ (created by sweep.py; create it if you move this file).",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --array=0-{len(cmds) - 1}{limit}",
        f"#SBATCH --cpus-per-task={args.cpus}",
        f"#SBATCH --mem={args.mem}",
        f"#SBATCH --time={args.time}",
        f"#SBATCH --output={logs}/%A_%a.out",
    ]
    if args.gpus_per_run:
        lines.append(f"#SBATCH --gres=gpu:{args.gpus_per_run}")
    if args.partition:
        lines.append(f"#SBATCH --partition={args.partition}")
    if args.account:
        lines.append(f"#SBATCH --account={args.account}")
    lines += [
        "# The commands run with --python as given (default: python); activate your environment first or",
        "# generate this file with --python /path/to/.venv/bin/python.",
        "set -euo pipefail",
        ': "${SLURM_ARRAY_TASK_ID:?submit this script with sbatch; it is a job array}"',
        f"cd {shlex.quote(str(workdir))}",
        "COMMANDS=(",
        *[f"  {shlex.quote(shlex.join(cmd))}" for cmd in cmds],
        ")",
        'echo "array task ${SLURM_ARRAY_TASK_ID}: ${COMMANDS[$SLURM_ARRAY_TASK_ID]}"',
        'eval "exec ${COMMANDS[$SLURM_ARRAY_TASK_ID]}"',
    ]
    return "\n".join(lines) + "\n"


def shares_gpus(workers: int, devices: list[str]) -> bool:
    """Whether runs of the pool share a GPU: more workers than devices, or several workers without
    --devices, when every run sees every GPU."""
    return workers > max(len(devices), 1)


def with_gpu_growth(cmd: list[str]) -> list[str]:
    """`cmd` with --gpu_memory growth, unless its flags set gpu_memory already."""
    if any(token.split("=", 1)[0] == "--gpu_memory" for token in cmd):
        return cmd
    return [*cmd, "--gpu_memory", "growth"]


def launch(args: argparse.Namespace, cmds: list[list[str]]) -> int:
    """Run the commands in a local pool; each run's output goes to ROOT/sweep_logs/<task>_seed<S>.log."""
    logs = Path(args.root) / "sweep_logs"
    logs.mkdir(parents=True, exist_ok=True)
    devices = [device.strip() for device in args.devices.split(",") if device.strip()]
    if shares_gpus(args.workers, devices):
        where = f"{len(devices)} GPU{'s' if len(devices) != 1 else ''}" if devices else "the visible GPUs"
        print(f"{args.workers} workers share {where}: every run starts with --gpu_memory growth", flush=True)
        cmds = [with_gpu_growth(cmd) for cmd in cmds]
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(args.workers):
        slots.put(slot)
    running: set[subprocess.Popen] = set()
    lock = threading.Lock()
    stopping = threading.Event()

    def run(cmd: list[str]) -> tuple[list[str], int]:
        if stopping.is_set():
            return cmd, -1
        slot = slots.get()
        try:
            env = dict(os.environ)
            if devices:
                env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
            task, seed = cmd[cmd.index("--task") + 1], cmd[cmd.index("--seed") + 1]
            log = logs / f"{task}_seed{seed}.log"
            print(f"start: {shlex.join(cmd)}  (log: {log})", flush=True)
            with open(log, "ab") as file:
                process = subprocess.Popen(cmd, stdout=file, stderr=subprocess.STDOUT, env=env)
                with lock:
                    running.add(process)
                code = process.wait()
                with lock:
                    running.discard(process)
            print(f"{'done' if code == 0 else f'FAILED (exit {code})'}: {task} seed {seed}", flush=True)
            return cmd, code
        finally:
            slots.put(slot)

    pool = ThreadPoolExecutor(max_workers=args.workers)
    try:
        results = list(pool.map(run, cmds))
    except KeyboardInterrupt:
        # Stop queued runs and the trainings this sweep started; their logdirs keep what they saved.
        stopping.set()
        pool.shutdown(wait=False, cancel_futures=True)
        with lock:
            for process in running:
                process.terminate()
        print("interrupted: stopped the running trainings; launching again resumes them", file=sys.stderr)
        return 130
    pool.shutdown()
    failed = [cmd for cmd, code in results if code != 0]
    print(f"sweep finished: {len(cmds) - len(failed)} of {len(cmds)} runs succeeded")
    for cmd in failed:
        print(f"failed: {shlex.join(cmd)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    cmds = commands(args, extra)
    if args.launch:
        return launch(args, cmds)
    text = slurm_script(args, cmds) if args.format == "slurm" else command_list(cmds)
    workdir = Path(args.workdir).expanduser().resolve()
    if args.format == "slurm" and workdir.is_dir():
        # SLURM does not create the directory of --output; without it the array tasks fail silently.
        (workdir / args.root / "slurm").mkdir(parents=True, exist_ok=True)
    if args.out:
        Path(args.out).expanduser().write_text(text)
        print(f"wrote {len(cmds)} commands to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
