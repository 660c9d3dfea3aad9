FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md streamlearn.toml ./
COPY streamlearn ./streamlearn
COPY kernels ./kernels
COPY services ./services
# A wheel install (not editable): only the streamlearn package lands in site-packages.
RUN pip install --no-cache-dir . && useradd -m streamlearn
USER streamlearn
ENV STREAMLEARN_CONFIG=/app/streamlearn.toml
ENTRYPOINT ["streamlearn"]
