# Training image: TensorFlow 2.21 with CUDA, the pinned requirements and this project.
#   docker build -t dreamerv2_tf .
#   docker run --gpus all -v "$PWD/logdir:/logdir" dreamerv2_tf                      # Pong, release settings
#   docker run --gpus all -v "$PWD/logdir:/logdir" dreamerv2_tf --configs defaults atari \
#       --task atari_breakout --logdir /logdir/atari_breakout/seed0
# The base tag must match the tensorflow pin in requirements.txt (tests/test_docker.py checks it).
# The official TensorFlow images ship Python 3.11 (Ubuntu 22.04), the version pyproject.toml
# requires; a check before installing the requirements stops the build with a clear message otherwise.
FROM tensorflow/tensorflow:2.21.0-gpu

# MuJoCo (DM Control) renders headless through EGL; the NVIDIA runtime mounts the driver's EGL
# library when the "graphics" capability is requested. pip may install into the image's Python.
ENV MUJOCO_GL=egl \
    PYOPENGL_PLATFORM=egl \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    TF_CPP_MIN_LOG_LEVEL=2

# Distribution versions float with the base image's package lists, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libegl1 libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /dreamerv2_tf

# Dependencies first, so editing the code reuses this (large) layer.
COPY requirements.txt .
RUN python3 -c "import sys; v = sys.version_info[:2]; assert v == (3, 11), f'base image has Python {v}, need 3.11'" \
    && python3 -m pip install -r requirements.txt

# Editable install: configs.yaml is read from the source tree next to the package.
COPY . .
RUN python3 -m pip install --no-deps -e . \
    && python3 -c "import dreamerv2_tf, ale_py, gymnasium; print('dreamerv2_tf', dreamerv2_tf.__version__)"

VOLUME ["/logdir"]
ENTRYPOINT ["python3", "scripts/train.py"]
CMD ["--configs", "defaults", "atari", "--task", "atari_pong", "--logdir", "/logdir"]
