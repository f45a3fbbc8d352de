"""The docs stay true to the code: their commands parse, their links resolve, the README stays short.

Which text counts as a command, in README.md and docs/*.md:

- every fenced block tagged `sh`, `bash`, `shell` or `console`;
- every untagged fenced block with a line that starts with `python scripts/` (or `.venv/bin/python scripts/`);
- every inline code span that starts with `python scripts/`.

Blocks tagged otherwise (python, yaml, json, text) are not read. In a block, `#` comments are dropped,
backslash continuations joined, and commands split on newlines, `&&`, `||`, `;` and `|`; redirections
(`> file`) are dropped, and so are leading `VAR=value` assignments and the directory of the program
(`.venv/bin/python` is `python`). Shell blocks hold runnable examples, not templates: a placeholder such
as `<name>` or a `[--a | --b]` alternative is an error, so every command can be checked as written.

Each `python scripts/NAME.py ARGS` (also `python3`, and `docker run ... dreamerv2_tf ARGS`, whose entry
point is scripts/train.py, or with `--entrypoint python3 ... scripts/NAME.py ARGS`) is checked in-process,
without TensorFlow, with the script's own parser:

- train.py, bench.py: the config loader, as `--print_config` runs it (unknown config names and keys, values
  of the wrong type or out of range fail), plus the task name;
- scores.py, plot.py, sweep.py: their `parse_args(argv)`; sweep.py's flags after `--` also go through the
  config loader, as the train.py commands it writes would;
- eval.py, export.py, openloop.py, compare_release.py, compare_release_run.py, compare_release_loop.py,
  bench_reference.py build their parser inside `main()`, so main runs with argparse's parse methods replaced
  by ones that stop right after a successful parse (and TensorFlow blocked, should a script get past that);
  the remaining flags of compare_release.py and compare_release_run.py go through the config loader.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dreamerv2_tf import cli

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300

SHELL_TAGS = ("sh", "bash", "shell", "console")
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
SCRIPT_LINE = re.compile(r"^\s*(?:\S*/)?python3?\s+scripts/")
INLINE_COMMAND = re.compile(r"(?<!`)`((?:\S*/)?python3? scripts/[^`]+)`(?!`)")
PLACEHOLDER = re.compile(r"<[A-Za-z][\w .-]*>|\[--[^\]]*\]")
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
OPERATORS = ("&&", "||", ";", "|", "&")
REDIRECTS = (">", ">>", "<", ">&", "<&", "&>")
PYTHON = re.compile(r"^python3?(\.\d+)?$")
DOCKER_IMAGE = "dreamerv2_tf"
LOAD_FAILED = "cannot load the script or its parser"


# ---------------------------------------------------------------------------------------------- markdown


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def fenced_blocks(text: str) -> Iterator[tuple[str, int, list[str]]]:
    """(tag, line number of the first content line, lines) of every fenced block."""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        fence, tag, start = match.group(2), match.group(3).lower(), index + 1
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(fence[0] * len(fence)):
            index += 1
        yield tag, start + 1, lines[start:index]
        index += 1


def prose(text: str) -> str:
    """The text outside fenced blocks (those lines blanked, so line numbers stay)."""
    lines = text.splitlines()
    for _, start, body in fenced_blocks(text):
        for number in range(start - 2, start + len(body)):
            if 0 <= number < len(lines):
                lines[number] = ""
    return "\n".join(lines)


def logical_lines(body: list[str], first: int) -> Iterator[tuple[int, str]]:
    """Join backslash continuations; yield (line number, text) of each logical line."""
    pending, start = "", first
    for offset, line in enumerate(body):
        if not pending:
            start = first + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.commenters = "#"
    lexer.whitespace_split = True
    return list(lexer)


def split_commands(line: str) -> list[list[str]]:
    """A shell line -> argv lists: split on operators, without redirections and leading assignments."""
    commands: list[list[str]] = [[]]
    words = tokens(line)
    index = 0
    while index < len(words):
        word = words[index]
        if word in OPERATORS:
            commands.append([])
        elif word in REDIRECTS:
            index += 1  # and its target
            if commands[-1] and commands[-1][-1].isdigit():  # 2> file
                commands[-1].pop()
        else:
            commands[-1].append(word)
        index += 1
    result = []
    for argv in commands:
        while argv and ASSIGNMENT.match(argv[0]):
            argv = argv[1:]
        if argv and argv[0] == "export":
            continue
        if argv:
            result.append(argv)
    return result


def page_commands(path: Path) -> Iterator[Command]:
    """Every shell command of a page (see the module docstring for which text counts)."""
    text = path.read_text()
    name = path.relative_to(ROOT).as_posix()
    for tag, start, body in fenced_blocks(text):
        if tag in SHELL_TAGS or (not tag and any(SCRIPT_LINE.match(line) for line in body)):
            for number, line in logical_lines(body, start):
                if line.strip():
                    yield Command(name, number, line.strip())
    outside = prose(text)
    for match in INLINE_COMMAND.finditer(outside):
        number = outside.count("\n", 0, match.start()) + 1
        yield Command(name, number, " ".join(match.group(1).split()))


def all_commands() -> list[Command]:
    return [command for page in PAGES for command in page_commands(page)]


# ---------------------------------------------------------------------------------------------- scripts


class Parsed(Exception):
    """Raised by the patched argparse methods once the real parse succeeded."""

    def __init__(self, namespace: argparse.Namespace, rest: list[str]) -> None:
        super().__init__("parsed")
        self.namespace, self.rest = namespace, rest


_state = threading.local()
_LOADED: dict[str, object] = {}


def load_script(name: str):
    """scripts/NAME as a module (its `if __name__ == "__main__"` part does not run)."""
    if name not in _LOADED:
        path = SCRIPTS / name
        spec = importlib.util.spec_from_file_location(f"_docs_script_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(SCRIPTS))  # scripts import their siblings (release_side)
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(SCRIPTS))
        _LOADED[name] = module
    return _LOADED[name]


@contextlib.contextmanager
def stop_after_parsing() -> Iterator[None]:
    """Make argparse raise Parsed after a successful parse, and block TensorFlow meanwhile."""
    original_args, original_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args

    def parse_args(self, args=None, namespace=None):
        _state.inside = True
        try:
            result = original_args(self, args, namespace)
        finally:
            _state.inside = False
        raise Parsed(result, [])

    def parse_known_args(self, args=None, namespace=None):
        result = original_known(self, args, namespace)
        if getattr(_state, "inside", False):
            return result
        raise Parsed(*result)

    saved = {name: sys.modules.get(name, ...) for name in ("tensorflow", "keras")}
    argparse.ArgumentParser.parse_args = parse_args
    argparse.ArgumentParser.parse_known_args = parse_known_args
    sys.modules.update(dict.fromkeys(saved))  # `import tensorflow` now raises ImportError
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original_args
        argparse.ArgumentParser.parse_known_args = original_known
        for name, module in saved.items():
            if module is ...:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def run_quietly(fn, *args) -> tuple[int | None, str, str, object]:
    """(exit status or None, stdout, stderr, return value or exception) of fn(*args)."""
    out, err = io.StringIO(), io.StringIO()
    status, value = None, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            value = fn(*args)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Parsed as parsed:
            value = parsed
        except Exception as exc:  # reported by the caller
            value = exc
    return status, out.getvalue(), err.getvalue(), value


def check_task(task: str) -> str | None:
    from dreamerv2_tf.envs import check_task

    try:
        check_task(task)
    except ValueError as exc:
        return str(exc)
    return None


def check_config_args(args: list[str], prog: str = "train.py") -> str | None:
    """Problem with train.py-style flags, or None: config.from_cli with --print_config, then the task."""
    status, out, err, value = run_quietly(cli.from_cli, [*args, "--print_config", "true"], prog)
    if status != 0:
        return (err.strip() or repr(value)) + f" (exit status {status})"
    if any(arg in ("-h", "--help") for arg in args):
        return None
    return check_task(yaml.safe_load(out)["task"])


def check_bench(args: list[str]) -> str | None:
    bench = load_script("bench.py")
    status, out, err, value = run_quietly(bench.main, [*args, "--print_config", "true"])
    if status != 0:
        return (err.strip() or repr(value)) + f" (exit status {status})"
    return None


def check_parse_args(name: str, args: list[str]) -> str | None:
    """Scripts with a parse_args(argv) function."""
    module = load_script(name)
    status, _, err, value = run_quietly(module.parse_args, args)
    if status is not None:
        return None if status == 0 and ("-h" in args or "--help" in args) else f"{err.strip()} (exit status {status})"
    if isinstance(value, Exception):
        return repr(value)
    if name == "sweep.py":
        parsed, extra = value
        return check_config_args(["--configs", *parsed.configs, *extra]) if extra else None
    return None


def check_main(name: str, args: list[str], argv0: bool = False) -> str | None:
    """Scripts whose parser lives inside main(): run main until its parse succeeds."""
    module = load_script(name)
    saved_argv = sys.argv
    try:
        with stop_after_parsing():
            if argv0:  # main() reads sys.argv itself
                sys.argv = [name, *args]
                status, _, err, value = run_quietly(module.main)
            else:
                status, _, err, value = run_quietly(module.main, args)
    finally:
        sys.argv = saved_argv
    if status is not None:
        return None if status == 0 and ("-h" in args or "--help" in args) else f"{err.strip()} (exit status {status})"
    if not isinstance(value, Parsed):
        return f"main() did not stop at argument parsing: {value!r}"
    if name in ("compare_release.py", "compare_release_run.py"):
        return check_config_args(value.rest, name)
    return None


CHECKERS = {
    "train.py": check_config_args,
    "bench.py": check_bench,
    "scores.py": lambda args: check_parse_args("scores.py", args),
    "plot.py": lambda args: check_parse_args("plot.py", args),
    "coverage.py": lambda args: check_parse_args("coverage.py", args),
    "sweep.py": lambda args: check_parse_args("sweep.py", args),
    "eval.py": lambda args: check_main("eval.py", args),
    "export.py": lambda args: check_main("export.py", args),
    "openloop.py": lambda args: check_main("openloop.py", args),
    "compare_release.py": lambda args: check_main("compare_release.py", args),
    "compare_release_run.py": lambda args: check_main("compare_release_run.py", args),
    "bench_reference.py": lambda args: check_main("bench_reference.py", args, argv0=True),
    "compare_release_loop.py": lambda args: check_main("compare_release_loop.py", args, argv0=True),
}


def script_call(argv: list[str]) -> tuple[str, list[str]] | None:
    """(script file name, its arguments) when argv runs one of scripts/, else None."""
    program = argv[0].rsplit("/", 1)[-1]
    if PYTHON.match(program) and len(argv) > 1 and argv[1].startswith("scripts/"):
        return argv[1][len("scripts/"):], argv[2:]
    if program == "docker" and len(argv) > 1 and argv[1] == "run" and DOCKER_IMAGE in argv:
        options, rest = argv[2:argv.index(DOCKER_IMAGE)], argv[argv.index(DOCKER_IMAGE) + 1:]
        entrypoint = options[options.index("--entrypoint") + 1] if "--entrypoint" in options else None
        if entrypoint is None:
            return "train.py", rest
        if PYTHON.match(entrypoint) and rest and rest[0].startswith("scripts/"):
            return rest[0][len("scripts/"):], rest[1:]
    return None


def check_command(text: str) -> list[str]:
    """Problems of one documented shell line (empty when every scripts/ command in it parses)."""
    if PLACEHOLDER.search(text):
        return [f"placeholder {PLACEHOLDER.search(text).group(0)!r} in a shell block; write a runnable example"]
    try:
        commands = split_commands(text)
    except ValueError as exc:  # unbalanced quotes
        return [f"cannot split into words: {exc}"]
    problems = []
    for argv in commands:
        call = script_call(argv)
        if call is None:
            continue
        name, args = call
        if not (SCRIPTS / name).is_file():
            problems.append(f"scripts/{name} does not exist")
        elif name not in CHECKERS:
            problems.append(f"no argument check for scripts/{name}; add one to CHECKERS in tests/test_docs.py")
        else:
            try:
                problem = CHECKERS[name](args)
            except Exception as exc:  # the script itself is broken: no import, no main, ...
                problem = f"{LOAD_FAILED} ({type(exc).__name__}: {exc})"
            if problem:
                problems.append(f"scripts/{name}: {problem}")
    return problems


# ---------------------------------------------------------------------------------------------- links

LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+).+?\1", re.S)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: rendered text lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower().strip()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in prose(path.read_text()).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def link_problems(path: Path) -> list[str]:
    """Relative links and images of a page whose file (or heading) does not exist."""
    text = INLINE_CODE.sub(lambda m: " " * len(m.group(0)), prose(path.read_text()))
    problems = []
    for match in LINK.finditer(text):
        target = match.group(2)
        if re.match(r"^(https?|mailto|ftp):", target):
            continue
        where = f"{path.relative_to(ROOT).as_posix()}:{text.count(chr(10), 0, match.start()) + 1}"
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            problems.append(f"{where}: {target} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: no heading #{anchor} in {resolved.relative_to(ROOT).as_posix()}")
    return problems


# ---------------------------------------------------------------------------------------------- tests

COMMANDS = all_commands()


def test_pages_have_commands():
    assert (ROOT / "docs").is_dir() and len(PAGES) > 1
    assert len(COMMANDS) > 20, "the command reader found almost no commands; did the block format change?"
    assert any(command.page == "README.md" for command in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: f"{command.page}:{command.line}")
def test_documented_command_parses(command):
    problems = check_command(command.text)
    assert not problems, f"{command}\n" + "\n".join(problems)


def test_readme_keeps_the_ci_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    line = "bash scripts/setup.sh && .venv/bin/python -m pytest"
    assert line in ci and f"\n{line}\n" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_links_resolve(page):
    problems = link_problems(page)
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_linked():
    linked = set()
    for page in PAGES:
        for match in LINK.finditer(prose(page.read_text())):
            file = match.group(2).partition("#")[0]
            if file.endswith(".md") and not file.startswith("http"):
                linked.add((page.parent / file).resolve())
    orphans = [page.name for page in PAGES[1:] if page.resolve() not in linked]
    assert not orphans, f"docs pages no page links to: {orphans}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {README_MAX_LINES})"


# The checker itself: a renamed flag, config key, config name, task or script must fail.

@pytest.mark.parametrize("text", [
    "python scripts/train.py --configs defaults atari --no_such_key 1",
    "python scripts/train.py --configs defaults no_such_config",
    "python scripts/train.py --configs defaults --steps 1.5",
    "python scripts/train.py --configs defaults --precision 8",
    "python scripts/train.py --configs defaults atari --task atari_pongg",
    "python scripts/train.py --configs defaults --task atrai_pong",
    "bash scripts/setup.sh && .venv/bin/python scripts/train.py --rssm.no_such 1",
    "python scripts/no_such_script.py --logdir runs/x",
    "python scripts/eval.py --logdir runs/x --no_such_flag 1",
    "python scripts/eval.py --episodes 3",
    "python scripts/openloop.py --logdir runs/x --count many",
    "python scripts/scores.py logdir --no_such_flag",
    "python scripts/plot.py runs/x --spread wide",
    "python scripts/plot.py runs/x --out curves.jpg",
    "python scripts/sweep.py --no_such_flag",
    "python scripts/sweep.py --seeds 0 -- --no_such_key 1",
    "python scripts/bench.py --configs defaults debug --no_such_key 1",
    "python scripts/bench.py --configs defaults debug --steps zero",
    "python scripts/compare_release.py --release .release --configs defaults --no_such_key 1",
    "python scripts/compare_release.py --configs defaults debug",
    "python scripts/compare_release_run.py --configs defaults vector --logdir runs/x --no_such_key 1",
    "python scripts/compare_release_run.py --logdir runs/x --threads",
    "python scripts/bench_reference.py --path .release --no_such_flag 1",
    "docker run --gpus all -v \"$PWD/logdir:/logdir\" dreamerv2_tf --configs defaults --no_such_key 1",
    "docker run --rm --entrypoint python3 dreamerv2_tf scripts/plot.py /logdir --no_such_flag",
    "python scripts/train.py --configs defaults vector <name>",
    "python scripts/train.py --configs defaults [--rssm.discrete 0 | --kl.balance 0.5]",
])
def test_checker_refuses_bad_commands(text):
    problems = check_command(text)
    assert problems and not any(LOAD_FAILED in problem for problem in problems), problems


@pytest.mark.parametrize("text", [
    "MUJOCO_GL=egl .venv/bin/python scripts/train.py --configs defaults dmc_vision --task dmc_walker_walk",
    "python scripts/train.py --configs defaults atari --'.*\\.norm' layer --actor_ent 'linear(3e-3,1e-4,1e6)'",
    "python scripts/eval.py --logdir runs/x --episodes 2 --video x.mp4 > out.txt",
    "python scripts/sweep.py --seeds 0 1 -- --steps 1e6 | head -1",
    "python scripts/compare_release.py --release .release --configs defaults debug --task atari_pong --updates 2",
    "python scripts/bench_reference.py --path .release --steps 2",
    "python scripts/train.py --help",
])
def test_checker_accepts_good_commands(text):
    assert check_command(text) == []


def test_reader_splits_commands():
    body = ["# a comment", "CUDA_VISIBLE_DEVICES=0 python scripts/train.py --configs defaults \\",
            "    atari --seed 1 && .venv/bin/python scripts/eval.py --logdir 'a b'; echo done"]
    lines = list(logical_lines(body, 10))
    assert [number for number, _ in lines] == [10, 11]
    assert split_commands(lines[1][1]) == [
        ["python", "scripts/train.py", "--configs", "defaults", "atari", "--seed", "1"],
        [".venv/bin/python", "scripts/eval.py", "--logdir", "a b"], ["echo", "done"]]
    assert split_commands(lines[0][1]) == []


def test_link_checker_finds_broken_links(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# Some Heading: `code` and more\n## Some Heading: `code` and more\n")
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](other.md#some-heading-code-and-more) [ok2](other.md#some-heading-code-and-more-1)"
                    " [self](#title) ![img](missing.png) [bad](other.md#nope) [web](https://example.com/x)\n"
                    "`[not a link](nowhere.md)`\n```sh\n[nor this](nowhere.md)\n```\n")
    problems = link_problems(page)
    assert len(problems) == 2 and "missing.png" in problems[0] and "#nope" in problems[1], problems
