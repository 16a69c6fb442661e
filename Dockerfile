# syntax=docker/dockerfile:1
# One image definition for every service: SERVICE picks the command (docker/start).
#   docker build --build-arg SERVICE=campaign_service -t campaign-platform/campaign_service .
ARG PYTHON_VERSION=3.11

# ---- build: a virtual environment from the hash-pinned runtime lock, then the project --------
FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements-runtime.lock /tmp/requirements-runtime.lock
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes --no-deps -r /tmp/requirements-runtime.lock
# The project as a package (its five packages, the migrations, the console scripts), after the
# dependencies so that a code change rebuilds only this layer. .dockerignore admits the source.
COPY . /tmp/src
RUN /opt/venv/bin/pip install --no-deps /tmp/src

# ---- runtime: the virtual environment alone, as a non-root user -------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime
ARG SERVICE=user_service
ARG PORT=8000
ENV SERVICE=${SERVICE} \
    PORT=${PORT} \
    JWT_DEV_KEY_FILE=/var/lib/campaign-platform/jwt-dev-signing-key.pem \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home app \
 && mkdir -p /var/lib/campaign-platform \
 && chown app:app /var/lib/campaign-platform
COPY --from=build /opt/venv /opt/venv
COPY docker/start /usr/local/bin/start
# The code is in the virtual environment; the working directory holds none.
WORKDIR /app
USER app
EXPOSE ${PORT}
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-m", "shared.healthcheck"]
CMD ["start"]
