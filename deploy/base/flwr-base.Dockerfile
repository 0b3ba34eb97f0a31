# The equivalent of Flower's official images (flwr/superlink, flwr/supernode), built from Debian packages
# for machines that reach no image registry. Same layout as Flower's: the pinned flwr in the virtual
# environment /python/venv, non-root user `app` (uid 49999) whose home and working directory is /app.
# The Debian root filesystem comes from `mmdebstrap` + `podman import` (deploy/images.py does both):
#   mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm rootfs.tar
#   podman import rootfs.tar localhost/fedseg/debian:bookworm
# Then fedseg's Dockerfiles take this image as their base: --build-arg BASE_IMAGE=localhost/fedseg/flwr-base:1.42.0
ARG DEBIAN_IMAGE=localhost/fedseg/debian:bookworm
FROM ${DEBIAN_IMAGE}

ARG FLWR_VERSION=1.42.0
# e.g. "--no-index --find-links /wheels" with a wheelhouse mounted at build time (podman build -v DIR:/wheels:ro)
ARG PIP_ARGS=""
RUN useradd --uid 49999 --user-group --home-dir /app --no-create-home --shell /usr/sbin/nologin app \
 && mkdir -p /app && chown app:app /app \
 && python3 -m venv /python/venv \
 && /python/venv/bin/pip install --no-cache-dir --disable-pip-version-check ${PIP_ARGS} "flwr==${FLWR_VERSION}" \
 && chown -R app:app /python/venv

ENV PATH=/python/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONIOENCODING=UTF-8 \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8
WORKDIR /app
USER app
ENV HOME=/app
