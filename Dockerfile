# A runnable fiji-bridge image: Java, ImageJ 1 (Debian's libij-java), Xvfb and
# the bridge. Mount a Fiji.app and set FIJI_BRIDGE_IMAGEJ to use Fiji instead.
#   docker build -t fiji-bridge .
#   docker run --rm -p 5570:5570 -p 6570:6570 -v $PWD/keys:/keys fiji-bridge \
#       fiji-bridge serve --host 0.0.0.0 --keys /keys
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      default-jdk-headless libij-java xvfb xauth make g++ libssl-dev libbz2-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/fiji-bridge
COPY pyproject.toml README.md Makefile ./
COPY scripts ./scripts
COPY fiji_bridge ./fiji_bridge
COPY macros ./macros
RUN pip install --no-cache-dir -e . \
 && PY=python bash scripts/build-zeroc-ice.sh \
 && pip install --no-cache-dir --find-links /root/.cache/fiji-bridge/wheelhouse -e '.[omero]'

ENV JAVA_HOME=/usr/lib/jvm/default-java
EXPOSE 5570 6570
CMD ["fiji-bridge", "serve", "--port", "5570"]
