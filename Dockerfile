# syntax=docker/dockerfile:1
#
# One image for every process of the pipeline; Kubernetes picks the command:
#   bridge       python -m pubsub_bridge
#   worker       prefect worker start --pool taxi-kubernetes --type kubernetes --with-healthcheck
#   server       python -m taxi_pipeline.stack.prefect_server_start   (`prefect server start`
#                with a memoised app lookup; prefect-redis is a dependency)
#   flow runs    prefect flow-run execute        (set by the kubernetes worker as `args`)
#   deploy       python -m deploy --base-job-template /opt/taxi-pipeline/k8s/work-pool/base-job-template.json
#                (the Job taxi-deploy in k8s/base; TAXI_IMAGE names the flow-run image)
# There is no ENTRYPOINT on purpose: the worker passes the flow-run command as the
# container's args, which must replace CMD, not be appended to an entrypoint.
# No HEALTHCHECK either: Kubernetes probes own health (k8s/base).
#
# Base: the exact tag, pinned by the digest of its multi-architecture index
# (`docker buildx imagetools inspect python:3.11.14-slim-bookworm` shows it;
# update both together).

# --- build: the project and its runtime dependencies into a virtualenv ------------
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md deploy.py constraints.txt ./
COPY taxi_pipeline/ taxi_pipeline/
COPY flows/ flows/
COPY pubsub_bridge/ pubsub_bridge/
COPY automations/ automations/
# A regular (non-editable) install without extras: runtime dependencies only, at the
# exact versions the tests ran on (constraints.txt, written by scripts/lock.sh).
RUN /opt/venv/bin/pip install --no-cache-dir -c constraints.txt . \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib

# --- runtime: the virtualenv, a non-root user, nothing else ------------------------
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS runtime
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home \
       --shell /usr/sbin/nologin app \
    && mkdir -p /var/lib/prefect \
    && chown app:app /var/lib/prefect
COPY --from=build /opt/venv /opt/venv
# PREFECT_HOME is writable (an emptyDir on Kubernetes, where the root filesystem is
# read-only); bytecode is compiled at build time, so nothing writes .pyc files.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_HOME=/var/lib/prefect \
    HOME=/home/app
WORKDIR /home/app
# The kubernetes work pool's base job template: for `python -m deploy` (the Job
# taxi-deploy) and for the worker, which creates the pool with it if it starts first.
COPY k8s/work-pool/base-job-template.json /opt/taxi-pipeline/k8s/work-pool/base-job-template.json
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
CMD ["taxi-pipeline", "--help"]
