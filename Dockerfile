FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Copy only what the package build needs, so that a local virtualenv or build output never
# ends up in the image.
COPY pyproject.toml README.md /src/
COPY kaiju_tasks /src/kaiju_tasks
COPY migrations /src/migrations
RUN pip install /src && rm -rf /src

WORKDIR /app
ENTRYPOINT ["kaiju-tasks"]
CMD ["--help"]
