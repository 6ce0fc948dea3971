# uploadsrv on local disk: docker build -t uploadsrv . && docker run -p 1080:1080 -v uploads:/data uploadsrv
FROM python:3.11-slim

RUN useradd --system --uid 10001 --no-create-home uploadsrv \
    && mkdir /data && chown uploadsrv /data

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY uploadsrv ./uploadsrv
COPY storage ./storage
COPY loadtest ./loadtest
RUN pip install --no-cache-dir ".[s3,redis]"

USER uploadsrv
ENV UPLOADSRV_HOST=0.0.0.0 \
    UPLOADSRV_DATA_DIR=/data
VOLUME /data
EXPOSE 1080
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:1080/healthz')"
CMD ["uploadsrv", "serve"]
