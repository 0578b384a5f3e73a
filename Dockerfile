# The image of every node of an initstudy Ray cluster (head and workers): Ray's own image, plus
# torch and this project, so a job's driver and its trials import the same code everywhere.
#
#   CPU nodes:  docker build -t initstudy:cpu .
#   GPU nodes:  docker build -t initstudy:gpu --build-arg PLATFORM=gpu --build-arg TORCH_INDEX_URL= .
#               (PLATFORM=gpu is Ray's alias for its current CUDA 12 image; a pinned one is e.g.
#               cu128. An empty TORCH_INDEX_URL takes torch from PyPI, whose Linux wheels are CUDA
#               builds; or give PyTorch's index of a CUDA version, https://download.pytorch.org/whl/cu128.)
#
# The Ray version and the Python minor must equal those of every client (`ray job submit` runs
# anywhere, but drivers and workers must match the cluster): tests/test_docker.py checks both
# against the installed ray and pyproject.toml, and the torch pin against scripts/setup.sh.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG PLATFORM=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${PLATFORM}

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# torch first and pinned, from the index of the wanted build (CPU by default: a few hundred MB,
# not the multi-GB CUDA wheel). The pin is in TORCH_SPEC, where hadolint cannot see it.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "${TORCH_SPEC}" ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"}

WORKDIR /home/ray/initstudy
# Dependencies change less often than code: install them from pyproject.toml alone first (cached).
COPY --chown=ray:users pyproject.toml README.md ./
RUN mkdir pipeline && touch pipeline/__init__.py \
    && pip install --no-cache-dir -e . \
    && rm -rf pipeline initstudy.egg-info
COPY --chown=ray:users pipeline/ pipeline/
COPY --chown=ray:users conf/ conf/
COPY --chown=ray:users scripts/ scripts/
# Editable: conf/ is found beside the package (pipeline/config/composition.py), as in a checkout.
RUN pip install --no-cache-dir --no-deps -e . && python -m pipeline --help

# Ray's launchers (ray up, KubeRay) replace this with `ray start ...`; a bare `docker run` says how to use it.
CMD ["python", "-m", "pipeline", "--help"]
