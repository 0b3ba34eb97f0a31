# fedseg consortium server: Flower SuperLink + the fedseg ServerApp (run in a subprocess of the SuperLink).
# Build from the repo root:  docker build -f deploy/superlink.Dockerfile -t fedseg/superlink:0.1.0 .
# Default base: Flower's official image; the version matches the pinned flwr in requirements.txt (a test
# checks). Without a registry: --build-arg BASE_IMAGE=localhost/fedseg/flwr-base:1.42.0, the same layout built
# from Debian packages (deploy/base/flwr-base.Dockerfile, `python -m deploy.images build`).
ARG BASE_IMAGE=flwr/superlink:1.42.0
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
# The operator tools (python -m server certs); the app itself arrives as a FAB with `flwr run`.
COPY --chown=app:app pyproject.toml /app/
COPY --chown=app:app server /app/server
COPY --chown=app:app shared /app/shared
WORKDIR /app

ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

ENTRYPOINT ["flower-superlink"]
