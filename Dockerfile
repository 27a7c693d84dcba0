# One image for the AWS deployment, four binaries:
#   /usr/local/bin/command-api   the API server (default command; listens on BIND_ADDR)
#   /usr/local/bin/jobs          `jobs run sync|cleanup|auto-expire|delete-stale`, `jobs worker`
#   /usr/local/bin/projector     `projector poll|rebuild|verify`
#   /usr/local/bin/broker-audit  `broker-audit export|import|check|verify|replay` (audits, restores)
# The projector Lambda is not in here: it ships as a zip built with cargo lambda
# (docs/deploy-aws.md).
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.
# Build:              docker build -t sandbox-broker:<tag> .
# For Graviton/arm64: docker buildx build --platform linux/arm64 -t sandbox-broker:<tag> .
#                     (and container_architecture = "ARM64" in terraform)

# Base images are pinned by digest, so a rebuild uses exactly the bytes that were reviewed, even
# if the tag moves. The tag stays in the line for humans (and for scripts/pin-images.sh, which
# resolves each tag again and rewrites the digest: `bash scripts/pin-images.sh`). CI checks that
# every FROM line carries a digest (`bash scripts/pin-images.sh --check`). The digests below were
# taken from public references to these tags, not yet resolved against the registries by this
# project (its machines cannot reach them); the first pin-images.sh run confirms or replaces them.

# ---------------------------------------------------------------------------
# Build stage: the full Rust toolchain, discarded afterwards.
# ---------------------------------------------------------------------------
# The build and runtime stages use the same Debian release (trixie / debian13)
# so the binaries link against the glibc they run with.
FROM rust:1.95-slim-trixie@sha256:28846ec5a6bcfcddb93f403ba7071bd579787852b2f2ac3839965620e8bd9456 AS build

WORKDIR /src

# Strip symbols so the binaries stay small; the workspace profile already
# turns debug info off for release builds.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never

COPY . .

# The cache mounts keep the crate registry and the target directory between
# builds, so a source change recompiles only the workspace crates. --locked:
# build exactly what Cargo.lock says. TLS is rustls everywhere and SQLite is
# bundled, so no -dev packages are needed.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin command-api --bin jobs --bin projector --bin broker-audit \
    && mkdir -p /out/bin /out/data \
    && cp target/release/command-api target/release/jobs target/release/projector target/release/broker-audit /out/bin/

# ---------------------------------------------------------------------------
# Runtime stage: distroless (glibc, libgcc, CA certificates, tzdata; no shell,
# no package manager), running as the unprivileged `nonroot` user (65532).
# ---------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian13:nonroot@sha256:54df941ed0d06a1bd95ef5e0ce391fd8d9f94b64782dc9a60062727849ee3f97

LABEL org.opencontainers.image.title="sandbox-broker" \
      org.opencontainers.image.description="Sandbox Broker: command API, jobs runner and projector CLI" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=build /out/bin/ /usr/local/bin/

# A writable data directory owned by the runtime user, for the embedded mode
# (`docker run -p 8080:8080 -e BROKER_API_TOKEN=... -e BROKER_ADMIN_TOKEN=... <image>`
# starts the one-process demo with its local store). In AWS the store is DynamoDB and the task's root filesystem is
# mounted read-only.
WORKDIR /app
COPY --from=build --chown=65532:65532 /out/data /app/data

# Inside a container the server must listen on all interfaces. On a non-loopback
# address the server refuses to start with the built-in dev tokens: set
# BROKER_API_TOKEN and BROKER_ADMIN_TOKEN (at least 32 characters, distinct).
ENV BIND_ADDR=0.0.0.0:8080

EXPOSE 8080

USER 65532:65532

# Health: the image has no shell or curl to run a HEALTHCHECK with; the ALB
# target group (and any orchestrator) probes GET /healthz instead.
# checkov:skip=CKV_DOCKER_2:Distroless image without shell or HTTP client; health is probed externally on GET /healthz by the ALB target group.
CMD ["/usr/local/bin/command-api"]
