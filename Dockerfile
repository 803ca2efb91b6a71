# relay in a container: docker build -t relay . && docker run -v relay-spool:/var/lib/relay \
#   -v ./relay.yaml:/etc/relay/relay.yaml:ro -p 127.0.0.1:2525:2525 --stop-timeout 45 relay
# (--stop-timeout: relay drains in-flight sends for up to 30 s; Docker's default is 10 s.)
# Open files: relay needs limits.max_sessions + 100 (default 500 + 100) and checks at start.
# Docker's default comes from the daemon (often 1048576, sometimes 1024); to pin it, add
#   --ulimit nofile=4096:4096   (what systemd/relay.service sets: LimitNOFILE=4096)
# relay serve is PID 1 and starts one delivery process (python -m relay.deliver.process); it stops,
# restarts and reaps that child itself, so no init (--init) is needed.
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
    && cp relay/rules/rules.yaml /etc/relay/rules.yaml \
    && chown relay:relay /var/lib/relay \
    && chmod 0700 /var/lib/relay

VOLUME ["/var/lib/relay"]
USER relay
WORKDIR /var/lib/relay
# The spool without a `spool:` key: the volume (as systemd's StateDirectory= sets it).
ENV STATE_DIRECTORY=/var/lib/relay
# Mount relay.yaml at /etc/relay/relay.yaml. In a container it needs:
#   listen: 0.0.0.0:2525 with auth + tls  (beyond loopback; relay refuses to be an open relay)
#   metrics: 0.0.0.0:9325                 (the HEALTHCHECK asks 127.0.0.1:9325/healthz,
#                                          the default; `metrics: null` makes it unhealthy)
EXPOSE 2525 9325
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9325/healthz', timeout=4).status == 200 else 1)"]
CMD ["relay", "serve", "--config", "/etc/relay/relay.yaml"]
