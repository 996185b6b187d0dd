# Redis for the compose stack where no registry serves redis:7 (README, "Deploy"): Debian's redis-server on the
# same base as the imgq image. deploy/base-image.sh leaves the .debs in build/deploy/redis/debs:
#
#   docker build -f deploy/redis.Dockerfile --build-arg BASE_IMAGE=imgq-base:bookworm -t imgq-redis build/deploy/redis
#   REDIS_IMAGE=imgq-redis docker compose up -d
#
# With an empty debs/ directory it installs with apt-get instead (a base whose apt reaches a mirror).
# Like redis:7 it keeps its data in /data, owned by the redis user, so a named volume there starts writable;
# the compose file runs it as that user.
ARG BASE_IMAGE=imgq-base:bookworm
FROM ${BASE_IMAGE}

COPY debs/ /tmp/debs/
RUN set -e; \
    if ls /tmp/debs/*.deb >/dev/null 2>&1; then \
        dpkg -i /tmp/debs/*.deb; \
    else \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    rm -rf /tmp/debs; \
    redis-server --version; \
    mkdir -p /data && chown redis:redis /data

WORKDIR /data
VOLUME /data
USER redis
EXPOSE 6379
CMD ["redis-server"]
