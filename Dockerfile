# The pypnm container image: `docker build -t pypnm:0.1.0 .` from the repository root
# (BuildKit, the default builder since Docker 23, or podman/buildah: RUN --mount below).
#
# Two stages: the builder turns the project into a wheel (and fetches the wheels of its
# dependencies); the runtime stage installs those wheels, offline, into a virtual
# environment on a slim Python, and keeps neither the sources nor the build tools.
# The image runs as an unprivileged user and with a read-only root filesystem: the only
# places pypnm writes are its runtime directory (/run/pypnm) and /tmp, which are volumes
# (emptyDirs in deploy/kubernetes; `--tmpfs` with docker run, see README).
# Pin the base image by digest (python:3.11-slim-bookworm@sha256:…) for reproducible builds.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src/ src/
# pypnm's own wheel first, then every dependency's, into /wheels.
RUN python -m pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
# tini as PID 1: it forwards SIGTERM to the pypnm master and reaps orphans. pypnm's workers
# are children of its fork template; when a template is replaced, workers still draining are
# re-parented to PID 1, which must wait for them or they stay as zombies. (docker run --init
# does the same, but Kubernetes has no such switch.) Not pinned to a Debian revision: the
# archive drops old revisions, which would break the build; the base image pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 pypnm \
 && useradd --system --uid 10001 --gid pypnm --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin pypnm
# Install from the builder's wheels without copying them into a layer. The bytecode of the
# venv and of the standard library is compiled here, at build time: at run time the root
# filesystem is read-only and Python would otherwise compile every module in memory at
# each start. The runtime directory is created for plain `docker run` without a volume.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/pypnm \
 && /opt/pypnm/bin/pip install --no-cache-dir --no-index --find-links /wheels pypnm \
 && /opt/pypnm/bin/pip uninstall --yes pip \
 && python -m compileall -q -j 0 -x '/(test|tests|idle_test|lib2to3)/' \
        "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')" /opt/pypnm \
 && install -d -o 10001 -g 10001 -m 0700 /run/pypnm
ENV PATH=/opt/pypnm/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYPNM_RUNTIME_DIR=/run/pypnm
LABEL org.opencontainers.image.title="pypnm" \
      org.opencontainers.image.description="PyPNM web service with a zero-downtime reload supervisor" \
      org.opencontainers.image.licenses="Apache-2.0"
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# An empty directory: `pypnm serve` looks up --app modules in the working directory.
WORKDIR /srv/pypnm
EXPOSE 8000
# pypnm stops gracefully on SIGTERM: stops accepting, lets requests in flight finish
# within graceful_timeout, exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "pypnm", "serve"]
# Inside a container loopback is useless: listen on every address. Kubernetes' `args`
# replace this (deploy/kubernetes/deployment.yaml).
CMD ["--host", "0.0.0.0", "--port", "8000"]
