# HepatoQuant server image. It installs with scripts/install.sh, the same script CI runs (.ci/run -> make test),
# so every CI run proves these steps.
#
#   docker build -t hepatoquant .                                   # CPU image
#   docker build -t hepatoquant:cuda --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 .
#   docker run -p 50051:50051 -p 8080:8080 -v /data/slides:/slides:ro -v hq-models:/models -v hq-state:/state \
#       [--gpus all] hepatoquant serve --slide-root /slides
#
# The PyTorch wheel pinned in scripts/install.sh carries its own CUDA libraries, so the CUDA variant only
# changes the base image (drivers come from the host through the NVIDIA container toolkit).
ARG BASE=python:3.11-slim
FROM ${BASE}

RUN if ! command -v python3.11 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv && \
      ln -sf /usr/bin/python3.11 /usr/local/bin/python3; \
    fi && \
    apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/* && \
    useradd --create-home --uid 10001 hepatoquant

WORKDIR /opt/hepatoquant
COPY --chown=hepatoquant:hepatoquant . .
USER hepatoquant
RUN bash scripts/install.sh

ENV PATH="/opt/hepatoquant/.venv/bin:${PATH}" \
    HEPATOQUANT_MODELS_DIR=/models \
    HEPATOQUANT_STATE_DIR=/state
USER root
RUN mkdir -p /models /state /slides && chown hepatoquant:hepatoquant /models /state
USER hepatoquant
VOLUME ["/models", "/state", "/slides"]
EXPOSE 50051 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status != 200)"
ENTRYPOINT ["hepatoquant"]
CMD ["serve", "--slide-root", "/slides"]
