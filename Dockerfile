# relay in a container: docker build -t relay . && docker run -v relay-spool:/var/lib/relay \
#   -v ./relay.yaml:/etc/relay/relay.yaml:ro -p 127.0.0.1:2525:2525 relay
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY relay ./relay
RUN pip install -c constraints.txt . \
    && useradd --system --uid 10001 --home-dir /var/lib/relay --shell /usr/sbin/nologin relay \
    && mkdir -p /var/lib/relay /etc/relay \
    && cp relay/data/rules.yaml /etc/relay/rules.yaml \
    && chown relay:relay /var/lib/relay \
    && chmod 0700 /var/lib/relay

VOLUME ["/var/lib/relay"]
USER relay
WORKDIR /var/lib/relay
# In a container the listener must bind beyond loopback, so relay.yaml needs auth + tls
# (relay refuses to be an open relay); mount it at /etc/relay/relay.yaml.
EXPOSE 2525 9325
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9325/healthz', timeout=4).status == 200 else 1)"]
CMD ["relay", "serve", "--config", "/etc/relay/relay.yaml"]
