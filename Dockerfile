# syntax=docker/dockerfile:1
# One image for the whole system: sns-operator (the default command),
# sns-node (coordinator, server, synchronizer; the operator's pods run it
# with `command: [sns-node]`) and tsc (the client).
#
#   docker build -t tiny-sns:dev .
#
# Build stage: the workspace in release mode. protox compiles the protos,
# so no protoc is needed; ring (rustls) needs the C compiler the image has.
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sns-node -p sns-client -p sns-operator \
 && mkdir -p /out \
 && cp target/release/sns-node target/release/tsc target/release/sns-operator /out/

# Runtime: distroless glibc base (no shell, no package manager), as an
# unprivileged user whose id matches the pods' runAsUser (10001).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
EXPOSE 9000 8080
ENTRYPOINT []
CMD ["sns-operator", "run"]
