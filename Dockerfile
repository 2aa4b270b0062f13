# slimline: one image for the API, the workers and the one-shot migrations.
#   docker build -t slimline:cpu .                                (CPU torch, the default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t slimline:cu128 .   (CUDA torch, GPU workers)
FROM python:3.11-slim

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the index of the chosen variant: a bare `torch` requirement would pull the
# multi-GB CUDA build into CPU images. The project's `torch>=2.4` is then already satisfied.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}"

WORKDIR /app
COPY . /app
# Editable, so alembic.ini and migrations/ are found next to the packages.
RUN pip install -e . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin slimline \
    && mkdir -p /home/slimline/.slimline \
    && chown -R slimline:slimline /home/slimline

USER slimline
# Embedded-default state (and a Fashion-MNIST download, if SLIMLINE_DATA_DIR has none) lives here.
ENV SLIMLINE_HOME=/home/slimline/.slimline
EXPOSE 8000

CMD ["slimline", "api", "--host", "0.0.0.0", "--port", "8000"]
