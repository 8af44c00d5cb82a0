# p2pimg: peer-to-peer image fetcher exposing a read-only OCI registry on port 5050.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY p2pimg ./p2pimg
# Wheels for p2pimg and all its dependencies, so the final stage installs without a compiler.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="p2pimg" \
      org.opencontainers.image.description="Peer-to-peer container image fetcher with a read-only OCI registry" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    P2PIMG_HOME=/var/lib/p2pimg
# A fixed numeric UID lets Kubernetes' runAsNonRoot verify the user without /etc/passwd.
RUN groupadd --system --gid 10001 p2pimg \
    && useradd --system --uid 10001 --gid p2pimg --home-dir /var/lib/p2pimg \
       --no-create-home --shell /usr/sbin/nologin p2pimg \
    && mkdir -p /var/lib/p2pimg \
    && chown p2pimg:p2pimg /var/lib/p2pimg
# --no-index: everything was resolved in the builder; the final stage must not reach PyPI.
COPY --from=builder /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-index --find-links=/tmp/wheels /tmp/wheels/p2pimg-*.whl \
    && rm -rf /tmp/wheels
# Ownership is set above because changes to a path after VOLUME are discarded.
VOLUME /var/lib/p2pimg
WORKDIR /var/lib/p2pimg
USER 10001:10001
EXPOSE 5050
# http.client rather than urllib: it ignores HTTP(S)_PROXY, which must not apply to loopback.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import http.client, sys; c = http.client.HTTPConnection('127.0.0.1', 5050, timeout=4); c.request('GET', '/v2/'); sys.exit(0 if c.getresponse().status == 200 else 1)"]
ENTRYPOINT ["p2pimg"]
CMD ["serve", "--listen", "0.0.0.0:5050"]
