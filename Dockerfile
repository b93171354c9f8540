# syntax=docker/dockerfile:1
#
# oproxy as a container: ``docker build -t oproxy .`` then
#
#     docker run -p 8000:8000 -e OPROXY_ADMIN_KEY=... -e OLLAMA_HOST=http://ollama:11434 \
#         -v oproxy-state:/var/lib/oproxy oproxy
#
# The configuration is /etc/oproxy/oproxy.yaml (mount your own over it; the
# default, deploy/docker/oproxy.yaml, is driven by the environment), the state
# (keys, limits, quotas in SQLite) lives in the volume /var/lib/oproxy, and the
# daemon runs as an unprivileged user.  compose.yaml runs it with Ollama,
# Redis, Prometheus and Grafana.

ARG PYTHON_VERSION=3.11

# -- build: the wheel, from the source ------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY setup.cfg pyproject.toml README.rst ./
COPY oproxy ./oproxy
COPY twisted ./twisted
# oproxy and every dependency as wheels, so the next stage installs without
# a compiler or the network.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# -- run: the wheel and its dependencies, nothing else --------------------------
FROM python:${PYTHON_VERSION}-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STATE_DIRECTORY=/var/lib/oproxy
RUN groupadd --system --gid 10001 oproxy \
    && useradd --system --uid 10001 --gid oproxy --home-dir /var/lib/oproxy \
        --no-create-home --shell /usr/sbin/nologin oproxy \
    && install -d -o oproxy -g oproxy -m 0700 /var/lib/oproxy \
    && install -d -m 0755 /etc/oproxy
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels oproxy
COPY deploy/docker/oproxy.yaml /etc/oproxy/oproxy.yaml
VOLUME ["/var/lib/oproxy"]
USER oproxy:oproxy
WORKDIR /var/lib/oproxy
EXPOSE 8000
# No curl in a slim image: Python asks /healthz, which needs no key.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('OPROXY_PORT', '8000'), timeout=4)"]
# SIGTERM drains requests in flight (drain_timeout, 30 s): give it that long
# with `docker stop --time 45` or compose's stop_grace_period.
STOPSIGNAL SIGTERM
CMD ["twistd", "-n", "--pidfile=", "--logfile=-", "oproxy", "--config", "/etc/oproxy/oproxy.yaml"]
