# One image for the API server, the Ray head and the Ray workers.
#   docker build -t tsam-sweep .                                    # CPU torch
#   docker build -t tsam-sweep --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" .
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
ENV PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
WORKDIR /app
RUN pip install --no-cache-dir ${TORCH_SPEC}
COPY pyproject.toml README.md alembic.ini ./
COPY tsam_core tsam_core
COPY workers workers
COPY service service
COPY migrations migrations
RUN pip install --no-cache-dir -e '.[vision]'
EXPOSE 8000
CMD ["tsam", "serve", "--host", "0.0.0.0", "--port", "8000"]
