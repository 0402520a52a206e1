# aloe for GPU clusters: the whole recipe (curation, training on DeepSpeed, evaluation, inference).
#   docker build -t aloe .
#   docker run --rm --gpus all -v "$PWD:/data" aloe train --help
# The base is an official PyTorch CUDA runtime image (torch + torchvision built for its CUDA). To match a
# cluster's driver, pick another tag: docker build --build-arg BASE_IMAGE=pytorch/pytorch:<tag> -t aloe .
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HOME=/cache/huggingface

# The package, its training extras (TRL, DeepSpeed, datasets) and pandas for eval's VLMEvalKit reading;
# torch and torchvision come from the base.
WORKDIR /opt/aloe
COPY pyproject.toml README.md ./
COPY aloe_cli ./aloe_cli
# (DL3013 asks to pin PyPI releases; this is the local package, whose pyproject says what it needs)
# hadolint ignore=DL3013
RUN pip install ".[train,datasets,plot,vlmevalkit]"

# Run as a user, with the Hugging Face cache on a volume so downloaded checkpoints outlive the container.
RUN useradd --create-home --uid 1000 aloe \
    && mkdir -p /cache/huggingface /data \
    && chown -R aloe:aloe /cache /data
USER 1000:1000
VOLUME ["/cache/huggingface"]
WORKDIR /data

ENTRYPOINT ["aloe"]
CMD ["--help"]
