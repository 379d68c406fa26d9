# The image that `torchx run -s kubernetes ... --image` names: this repository at /dqrm and the pinned stack that
# `make env` installs, the pins read from pyproject.toml by scripts/requirements.py as `make` reads them.
#   docker build --build-arg FLAVOR=cpu -t dqrm:cpu .
#   docker build --build-arg FLAVOR=cuda -t dqrm:cuda .
# BASE_IMAGE needs what `make` needs: Python 3.11+ with venv (and bash, which torchx's job command runs in). The CUDA
# flavor needs no CUDA base image: PyPI's torch wheel brings its CUDA libraries, the container toolkit the driver.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# cpu: fbgemm-gpu-cpu; cuda: fbgemm-gpu. Named here because a build has no GPU for requirements.py to look at.
ARG FLAVOR=cpu
WORKDIR /dqrm

# The stack before the code, so that a change to the code reuses this layer: dqrm's documented install (README,
# "Install") of the pinned stack, then the repository itself. It installs as `dqrm` (dqrm.datasets, dqrm.pipeline, ...),
# so nothing shadows another package.
COPY pyproject.toml ./
COPY scripts/requirements.py scripts/
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --quiet --no-cache-dir --upgrade pip \
 && python3 scripts/requirements.py deps --fbgemm "$FLAVOR" > /opt/venv/requirements.txt \
 && /opt/venv/bin/python -m pip install --quiet --no-cache-dir -r /opt/venv/requirements.txt \
 && python3 scripts/requirements.py torchrec > /opt/venv/requirements-nodeps.txt \
 && /opt/venv/bin/python -m pip install --quiet --no-cache-dir --no-deps -r /opt/venv/requirements-nodeps.txt
ENV PATH=/opt/venv/bin:$PATH

COPY . .
RUN /opt/venv/bin/python -m pip install --quiet --no-cache-dir --no-deps . \
 && /opt/venv/bin/python -c "import torch, fbgemm_gpu, torchrec, dqrm.pipeline.train"
