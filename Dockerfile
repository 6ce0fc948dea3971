# uploadsrv: docker build -t uploadsrv . && docker run -p 1080:1080 -v uploads:/data uploadsrv
# The Python the suite runs on, pinned to its exact tag.
FROM python:3.11.7-slim-bookworm

LABEL org.opencontainers.image.title="uploadsrv" \
      org.opencontainers.image.description="Resumable upload server: tus 1.0, the IETF resumable-upload draft, a chunk API; local disk or S3" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="0.1.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A numeric user, so Kubernetes' runAsNonRoot can check it.
RUN useradd --system --uid 10001 --no-create-home uploadsrv \
    && mkdir /data && chown 10001:10001 /data

WORKDIR /app
# Dependencies first, from pyproject.toml alone: a change to the source reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extra = p['optional-dependencies']; open('requirements.txt', 'w').write('\n'.join(p['dependencies'] + extra['s3'] + extra['redis']))" \
    && pip install --requirement requirements.txt
COPY README.md LICENSE ./
COPY uploadsrv ./uploadsrv
COPY storage ./storage
COPY loadtest ./loadtest
RUN pip install --no-deps .

USER 10001:10001
ENV UPLOADSRV_HOST=0.0.0.0 \
    UPLOADSRV_PORT=1080 \
    UPLOADSRV_DATA_DIR=/data
VOLUME /data
EXPOSE 1080
# Liveness on the configured port (point a load balancer's readiness check at /readyz).
HEALTHCHECK --interval=30s --timeout=5s CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('UPLOADSRV_PORT', '1080'), timeout=4)"]
CMD ["uploadsrv", "serve"]
