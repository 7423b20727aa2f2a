# syntax=docker/dockerfile:1
# zdproxy container image.
#
#   docker build -t zdproxy .
#   docker run --rm -p 8080:8080 -p 9901:9901 -e ZDPROXY_ADMIN_TOKEN=change-me \
#     -v "$PWD/packaging/container/zdproxy.yaml:/etc/zdproxy/zdproxy.yaml:ro" zdproxy
#
# The config is mounted at /etc/zdproxy/zdproxy.yaml; the working directory
# /var/lib/zdproxy (owned by the zdproxy user) holds the saved state, mount a
# volume there to keep it across containers. See docs/operations.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a wheel of zdproxy and of each dependency (no compiler needed later);
# gcc lets setup.py compile the hot modules with mypyc (the wheel is the compiled
# build; --build-arg ZDPROXY_PURE=1 builds pure Python)
FROM ${PYTHON_IMAGE} AS build
ARG ZDPROXY_PURE=
ENV ZDPROXY_PURE=${ZDPROXY_PURE}
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY zdproxy ./zdproxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# ---- runtime: the wheels installed into a slim Python, run as a non-root user
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ZDPROXY_HEALTHCHECK_URL=http://127.0.0.1:9901/healthz
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels zdproxy \
 && groupadd --system --gid 10001 zdproxy \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/zdproxy --create-home \
      --shell /usr/sbin/nologin zdproxy \
 && mkdir -p /etc/zdproxy
WORKDIR /var/lib/zdproxy
# numeric, so that an orchestrator can check it is not root (runAsNonRoot)
USER 10001:10001
# data listener and admin API, as in packaging/container/zdproxy.yaml
EXPOSE 8080 9901
# zdproxy's graceful stop: stop accepting, finish in-flight requests, exit 0
STOPSIGNAL SIGTERM
# slim images have no curl; the admin /healthz answers 503 while shutting down
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['ZDPROXY_HEALTHCHECK_URL'], timeout=2)"]
# exec form: zdproxy is PID 1 and gets the signals itself (no shell in between)
ENTRYPOINT ["zdproxy"]
CMD ["run", "-c", "/etc/zdproxy/zdproxy.yaml"]
