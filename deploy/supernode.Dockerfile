# fedseg hospital node: Flower SuperNode + the fedseg ClientApp's dependencies (torch CPU, MONAI, Opacus).
# Build from the repo root:  docker build -f deploy/supernode.Dockerfile -t fedseg/supernode:0.1.0 .
# GPU sites: --build-arg TORCH_SPEC='torch==2.13.0' --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# Default base: Flower's official image; the version matches the pinned flwr in requirements.txt (a test
# checks). Without a registry: --build-arg BASE_IMAGE=localhost/fedseg/flwr-base:1.42.0, the same layout built
# from Debian packages (deploy/base/flwr-base.Dockerfile, `python -m deploy.images build`).
ARG BASE_IMAGE=flwr/supernode:1.42.0
FROM ${BASE_IMAGE}

# Dependencies are baked in at build time; nothing is installed when a run starts.
ARG TORCH_SPEC="torch==2.13.0+cpu"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
# e.g. "--no-index --find-links /wheels" with a wheelhouse mounted at build time (podman build -v DIR:/wheels:ro)
ARG PIP_ARGS=""
COPY --chown=app:app requirements.txt /app/requirements.txt
# Runtime requirements only: requirements.txt marks what tests and the research harness alone use (`# not in images`);
# flwr is the base image's.
RUN grep -v -e '^flwr' -e '# not in images' /app/requirements.txt > /tmp/deps.txt \
 && python -m pip install --no-cache-dir --disable-pip-version-check ${PIP_ARGS} --extra-index-url "${TORCH_INDEX}" "${TORCH_SPEC}" -r /tmp/deps.txt \
 && rm /tmp/deps.txt
# The compose file's state volume, owned by `app`: Docker and Podman give a new named volume the owner
# of the image's directory it is mounted on (else it is root's and the node could not write its ledger).
USER root
RUN mkdir -p /state && chown app:app /state
USER app
# The site tools (python -m client keygen, ...); the app itself arrives as a FAB with each run.
COPY --chown=app:app pyproject.toml /app/
COPY --chown=app:app client /app/client
COPY --chown=app:app shared /app/shared
# Flower's SuperNode with its fixed 3 s idle poll shortened (the flwr versions in shared/flower_compat/checked.py;
# stock Flower otherwise). flower_patches.py loads /app/shared/flower_compat (copied above) by path.
COPY --chown=app:app deploy/supernode.py deploy/flower_patches.py /app/deploy/
# The warm ClientApp executor for --isolation process (compose: the hospital-X-clientapps service).
COPY --chown=app:app deploy/clientapp_executor.py /app/deploy/
WORKDIR /app

ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

# Every argument is flower-supernode's, plus an optional --poll-interval S (default 0.25 s).
ENTRYPOINT ["python", "/app/deploy/supernode.py"]
