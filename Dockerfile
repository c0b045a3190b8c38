# HepatoQuant server image. It installs with scripts/install.sh, the same script CI runs (.ci/run -> make test),
# so every CI run proves these steps.
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/hepatoquant
COPY . .
RUN bash scripts/install.sh
ENV PATH="/opt/hepatoquant/.venv/bin:${PATH}" \
    HEPATOQUANT_MODELS_DIR=/models
VOLUME ["/models", "/slides", "/results"]
ENTRYPOINT ["hepatoquant"]
CMD ["--help"]
