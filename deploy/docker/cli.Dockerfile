# gridrender scheduler/CLI: validate, submit, status, finalize, export. No torch.
# Build from the repository root:  docker build -f deploy/docker/cli.Dockerfile -t gridrender-cli .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install .

RUN useradd --create-home --uid 10001 gridrender
USER gridrender
WORKDIR /home/gridrender
ENTRYPOINT ["gridrender"]
CMD ["--help"]
