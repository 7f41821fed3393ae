# celery-sidecar image: the sidecar (`celery-sidecar run`), the config renderer
# (`celery-sidecar render`) and Flower, as used by docker-compose.monitoring.yml.

# --- build: compilers live only here (some deps may build from source on new Pythons).
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
WORKDIR /src
COPY . .
RUN /opt/venv/bin/pip install . \
    # pip/setuptools are not needed to run; leaving them out shrinks the attack surface.
    && /opt/venv/bin/pip uninstall -y pip setuptools

# --- final: no compilers, no pip, non-root.
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SIDECAR_BIND=0.0.0.0 \
    SIDECAR_PORT=9808
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin sidecar \
    # Volume mount points owned by the user, so fresh named volumes are writable by `render`.
    && mkdir -p /out/nginx /out/prometheus /out/grafana/provisioning /out/grafana/dashboards /out/alertmanager \
        /var/lib/celery-sidecar \
    && chown -R sidecar:sidecar /out /var/lib/celery-sidecar
# The installed package carries everything `render` writes (templates, rules, dashboards).
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /tmp
EXPOSE 9808
# python, not curl: the slim image has no curl and we add no tools for a probe.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SIDECAR_PORT', '9808'), timeout=4)"]
CMD ["celery-sidecar", "run"]
