FROM node:20-bookworm-slim
# jemalloc instead of glibc's malloc: with thousands of TLS connections glibc fragments
# (per-connection TLS buffers churn between long-lived ones); measured in docs/performance.md.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libjemalloc2 \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s "/usr/lib/$(uname -m)-linux-gnu/libjemalloc.so.2" /usr/local/lib/libjemalloc.so.2
ENV LD_PRELOAD=/usr/local/lib/libjemalloc.so.2
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund
COPY . .
ENV FLEETHUB_HOST=0.0.0.0 FLEETHUB_DATA_DIR=/data
EXPOSE 4000 4001 4002
CMD ["node", "bin/fleethub.js", "serve"]
