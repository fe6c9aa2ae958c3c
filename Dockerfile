# The vitcx binary and nothing else, for cluster jobs (deploy/k8s-indexed-job.yaml).
#   docker build -t vitcx:0.1.0 .
# Standard Rust builder, slim runtime; the binary needs only glibc (TLS is rustls, the
# allocator is linked in).
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin vitcx

FROM debian:bookworm-slim
COPY --from=build /src/target/release/vitcx /usr/local/bin/vitcx
USER 65534:65534
ENTRYPOINT ["/usr/local/bin/vitcx"]
