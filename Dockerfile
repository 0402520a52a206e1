# aloe with the model-backed extras. Build: docker build -t aloe .
# For GPUs, start from a CUDA base that matches your driver and install the matching torch build first.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_DISABLE_TELEMETRY=1

WORKDIR /opt/aloe
COPY pyproject.toml README.md ./
COPY aloe_cli ./aloe_cli
RUN pip install --upgrade pip && pip install ".[models,datasets,plot]"

WORKDIR /data
ENTRYPOINT ["aloe"]
CMD ["--help"]
