# The image the docker-compose stack runs: celery-adaptive, Flower and the example project.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so editing the example project does not reinstall them.
COPY pyproject.toml README.md ./
COPY celery_adaptive ./celery_adaptive
RUN pip install . "flower>=2.0"

COPY example_project ./example_project
# `celery -A example_project` and `python -m example_project.loadgen` import it from here.
ENV PYTHONPATH=/app

# Celery warns against running a worker as root.
RUN useradd --system --create-home --uid 10001 celery
USER celery

CMD ["celery", "-A", "example_project", "worker", "-P", "celery_adaptive:Pool", "-l", "info"]
