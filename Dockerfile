# nextbest API image: one process, `nextbest serve`, configured by environment variables.
# Build:  docker build -t nextbest .
# Run:    docker run -p 8000:8000 -p 9100:9100 -e REDIS_URL=redis://redis:6379/0 \
#             -e NEXTBEST_API_KEYS="shop-web:decide:<sha256>,esp:email:<sha256>,etl:ingest:<sha256>,ops:admin:<sha256>" \
#             -e NEXTBEST_EMAIL_SIGNING_KEYS="k1:<32+ random characters>" -e NEXTBEST_PUBLIC_URL=https://decide.example.com \
#             -v $PWD/var/registry:/data/registry nextbest
# Keys: `nextbest keys new --name shop-web --scopes decide` prints a key and its entry (only the hash is configured).
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY engine engine
COPY training training
COPY feature_store feature_store
COPY api api
COPY benchmarks benchmarks
RUN python -m venv /venv && /venv/bin/pip install --upgrade "pip>=24,<27" \
    && /venv/bin/pip install -c constraints.txt .

FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data nextbest \
    && mkdir -p /data && chown nextbest /data
COPY --from=build /venv /venv
ENV PATH=/venv/bin:$PATH \
    NEXTBEST_HOST=0.0.0.0 \
    NEXTBEST_PORT=8000 \
    NEXTBEST_WORKERS=2 \
    NEXTBEST_DATA_DIR=/data \
    NEXTBEST_METRICS_PORT=9100 \
    OPENBLAS_NUM_THREADS=1
USER nextbest
WORKDIR /data
# 8000: the API (API keys from NEXTBEST_API_KEYS; without them it runs open and warns); 9100: /metrics, no key.
EXPOSE 8000 9100
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
# Without REDIS_URL the embedded Redis starts under /data (fine for a trial; use a real Redis in production).
CMD ["nextbest", "serve"]
