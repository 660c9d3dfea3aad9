# syntax=docker/dockerfile:1
# Two stages: the first builds wheels (streamlearn's and every dependency's), the second
# installs only those wheels, offline, into a slim image that runs as an unprivileged user.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streamlearn ./streamlearn
COPY kernels ./kernels
COPY services ./services
RUN pip install --no-cache-dir --upgrade pip \
 && pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    STREAMLEARN_CONFIG=/etc/streamlearn/streamlearn.toml
# A fixed numeric UID/GID so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 streamlearn \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/streamlearn streamlearn
COPY --from=build /wheels /tmp/wheels
# The wheel, not the source tree: only the installed package lands in the image.
RUN pip install --no-cache-dir --no-index --find-links /tmp/wheels streamlearn \
 && rm -rf /tmp/wheels
COPY streamlearn.toml /etc/streamlearn/streamlearn.toml
RUN mkdir -p /data/snapshots && chown streamlearn:streamlearn /data/snapshots
WORKDIR /home/streamlearn
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["streamlearn"]
CMD ["--help"]
