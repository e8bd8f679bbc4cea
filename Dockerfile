# clickpulse: one image for every role (engine, gateway, replay, zk ops); the role is the
# command, e.g. `clickpulse engine --id engine-1 …`. Built in three stages:
#   web    the dashboard (npm ci + vite build)
#   build  the Rust workspace, release
#   run    Debian slim with the binary, the dashboard and the MSNBC dataset
# syntax=docker/dockerfile:1

FROM node:20-bookworm-slim AS web
WORKDIR /src/web
COPY web/package.json web/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY web/ ./
RUN npm run build

FROM rust:1.95-bookworm AS build
# librdkafka is built from source by the rdkafka crate (make, perl, zlib).
RUN apt-get update && apt-get install -y --no-install-recommends cmake perl zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p clickpulse \
    && cp target/release/clickpulse /usr/local/bin/clickpulse

FROM debian:bookworm-slim AS run
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/clickpulse --create-home clickpulse
COPY --from=build /usr/local/bin/clickpulse /usr/local/bin/clickpulse
COPY --from=web /src/web/dist /srv/clickpulse/web
COPY data/ /srv/clickpulse/data/
USER clickpulse
WORKDIR /var/lib/clickpulse
ENV CLICKPULSE_WEB_DIR=/srv/clickpulse/web \
    CLICKPULSE_DATA=/srv/clickpulse/data/msnbc990928.seq.gz \
    RUST_LOG=info
ENTRYPOINT ["clickpulse"]
CMD ["--help"]
