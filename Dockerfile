# amalgamd and the amalgam CLI in a small runtime image.
#
#   docker build -t amalgam .                       # CPU: Debian's LibTorch
#   docker build -t amalgam:cuda --build-arg CUDA=12-1 \
#     --build-arg LIBTORCH_URL=https://download.pytorch.org/libtorch/cu121/libtorch-cxx11-abi-shared-with-deps-2.1.2%2Bcu121.zip .
#
# With CUDA set, the CUDA runtime comes from NVIDIA's Debian 12 repository and
# LibTorch is the official CUDA build from LIBTORCH_URL (Debian's is CPU-only).

ARG DEBIAN=debian:12

# ---------------------------------------------------------------------------
FROM ${DEBIAN} AS build
ARG CUDA=""
ARG LIBTORCH_URL=""
ENV DEBIAN_FRONTEND=noninteractive
WORKDIR /src
# The same set-up script as development and CI.
COPY scripts/setup.sh scripts/setup.sh
RUN bash scripts/setup.sh && apt-get install -y -q --no-install-recommends \
      ca-certificates curl unzip && rm -rf /var/lib/apt/lists/*
RUN if [ -n "$CUDA" ]; then \
      curl -fsSL -o /tmp/keyring.deb https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb && \
      dpkg -i /tmp/keyring.deb && apt-get update -q && \
      apt-get install -y -q --no-install-recommends cuda-toolkit-${CUDA} && \
      curl -fsSL -o /tmp/libtorch.zip "$LIBTORCH_URL" && unzip -q /tmp/libtorch.zip -d /opt && \
      rm -rf /tmp/*.zip /var/lib/apt/lists/*; \
    fi
COPY . .
RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DAMALGAM_BUILD_TESTS=OFF -DAMALGAM_BUILD_BENCH=OFF \
      ${CUDA:+-DTorch_DIR=/opt/libtorch/share/cmake/Torch} && \
    cmake --build /build --target amalgamd amalgam && \
    mkdir -p /out/bin && cp /build/bin/amalgamd /build/bin/amalgam /out/bin/ && \
    # The Debian packages that hold the shared libraries the binaries load;
    # fails the build when a library is missing or belongs to no package.
    ALLOW_UNPACKAGED=/opt/libtorch bash scripts/runtime-packages.sh \
      /out/bin/amalgamd /out/bin/amalgam > /out/packages.txt

# ---------------------------------------------------------------------------
FROM ${DEBIAN} AS runtime
ARG CUDA=""
ENV DEBIAN_FRONTEND=noninteractive
COPY --from=build /out/packages.txt /tmp/packages.txt
# With CUDA, the NVIDIA repository the build stage added (for the runtime).
COPY --from=build /etc/apt/sources.list.d/ /etc/apt/sources.list.d/
COPY --from=build /usr/share/keyrings/ /usr/share/keyrings/
RUN apt-get update -q && \
    apt-get install -y -q --no-install-recommends ca-certificates \
      libopenblas0-pthread $(cat /tmp/packages.txt) && \
    rm -rf /var/lib/apt/lists/* /tmp/packages.txt
# The official CUDA LibTorch is not a Debian package: copy it when used.
COPY --from=build /opt /opt
ENV LD_LIBRARY_PATH=/opt/libtorch/lib
COPY --from=build /out/bin/ /usr/local/bin/
RUN useradd --system --uid 10001 --home-dir /var/lib/amalgam --create-home amalgam
USER amalgam
WORKDIR /var/lib/amalgam
VOLUME /var/lib/amalgam
# gRPC, Prometheus metrics.
EXPOSE 50051 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["amalgam", "--server", "127.0.0.1:50051", "health"]
ENTRYPOINT ["amalgamd"]
# Listening beyond loopback needs a token file (mount it, e.g. from a secret).
# Tokens travel in plaintext inside the container network: publish the port
# on loopback only (docker-compose.yml), or put a mesh or ingress that
# terminates TLS in front; for TLS in amalgamd itself, replace the last flag
# with --tls-cert F --tls-key F.
CMD ["--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9464", \
     "--data-dir", "/var/lib/amalgam", "--tokens", "/etc/amalgam/tokens", \
     "--allow-plaintext-tokens"]
