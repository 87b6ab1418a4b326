# otpd container image: multi-stage build, non-root runtime, configured from OTPD_* env.
# Never built by `docker build` here (no Docker daemon on the machines otpd is made on);
# its build step, `cargo build --locked --bin otpd` on exactly the files copied below, is
# checked by hand. See docs/operating.md.
#
#   docker build -t otpd .
#   docker run -p 8080:8080 -v otpd-data:/var/lib/otpd otpd
#
# The first start on an empty store prints an API key once (see `docker logs`).

FROM rust:1-bookworm AS build
WORKDIR /src
# Manifests first so the dependency layer is reused while only sources change.
COPY Cargo.toml Cargo.lock ./
# How the bundled SQLite is built (see the file).
COPY .cargo ./.cargo
COPY src ./src
# The migrations are built into the binary.
COPY migrations ./migrations
# Workspace members: cargo loads their manifests even to build otpd alone.
COPY bench ./bench
RUN cargo build --release --locked --bin otpd \
    && strip target/release/otpd

FROM debian:bookworm-slim
# CA certificates: provider APIs and rediss:// / TLS Postgres are verified against them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/otpd --create-home otpd
COPY --from=build /src/target/release/otpd /usr/local/bin/otpd
USER otpd:otpd
WORKDIR /var/lib/otpd
ENV OTPD_SERVER__LISTEN=0.0.0.0:8080 \
    OTPD_DATA_DIR=/var/lib/otpd \
    OTPD_LOG__FORMAT=json
VOLUME ["/var/lib/otpd"]
EXPOSE 8080
# otpd drains in-flight requests on SIGTERM for server.shutdown_grace_seconds (20 s by
# default): give `docker stop` longer than that, e.g. `docker stop -t 30`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["otpd"]
CMD ["serve"]
