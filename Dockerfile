# syntax=docker/dockerfile:1
# Multi-stage: build a wheel with its dependencies, then a slim runtime as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY domain ./domain
COPY emulators ./emulators
COPY gateway ./gateway
COPY providers ./providers
RUN pip install --no-cache-dir --upgrade pip \
 && pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN groupadd --system gateway && useradd --system --gid gateway --home-dir /app --shell /usr/sbin/nologin gateway
WORKDIR /app
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/* && rm -rf /wheels
COPY config ./config
RUN mkdir -p data logs certs && chown -R gateway:gateway data logs certs
USER gateway
EXPOSE 8080
# Certificates and secrets come from the environment at run time (mounted certs/, *_env variables).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "config/gateway.yaml", "--host", "0.0.0.0"]
