# Sluice gateway image: python:3.11-slim, runs as an unprivileged user, no secrets inside.
# The provider key and client keys arrive at run time as files (OPENAI_API_KEY_FILE,
# SLUICE_CLIENT_KEYS_FILE); see k8s/ for the Kubernetes manifests.
#   docker build -t sluice:0.1.0 .
#   docker run -p 8080:8080 -e SLUICE_HOST=0.0.0.0 sluice:0.1.0     (simulated provider)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 sluice \
    && useradd --system --uid 10001 --gid sluice --home-dir /nonexistent --shell /usr/sbin/nologin sluice \
    && install -d -o sluice -g sluice -m 0750 /var/lib/sluice

WORKDIR /app
COPY pyproject.toml ./
COPY service ./service
RUN pip install . && rm -rf /app/build /app/*.egg-info

USER 10001:10001
ENV SLUICE_HOST=0.0.0.0 \
    SLUICE_PORT=8080 \
    SLUICE_DATA_DIR=/var/lib/sluice
EXPOSE 8080
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]
