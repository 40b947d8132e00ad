# syntax=docker/dockerfile:1
# Two stages: the build stage compiles TypeScript to dist/ with the dev dependencies; the runtime
# stage has only production dependencies, dist/ and the bins, runs as the unprivileged `node`
# user, in production mode (no development PKI, no generated admin password), and reports
# readiness to Docker. See docs/deploy.md.

FROM node:20-bookworm-slim AS build
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY scripts ./scripts
COPY server ./server
COPY device-client ./device-client
COPY shared ./shared
COPY certs/pki.ts ./certs/pki.ts
COPY migrations ./migrations
RUN npm run build

FROM node:20-bookworm-slim
# jemalloc instead of glibc's malloc: with thousands of TLS connections glibc fragments
# (per-connection TLS buffers churn between long-lived ones); measured in docs/performance.md.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libjemalloc2 \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s "/usr/lib/$(uname -m)-linux-gnu/libjemalloc.so.2" /usr/local/lib/libjemalloc.so.2
ENV LD_PRELOAD=/usr/local/lib/libjemalloc.so.2 NODE_ENV=production
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund && npm cache clean --force
COPY --from=build /src/dist ./dist
COPY bin ./bin
# The data directory belongs to the unprivileged user; certificates are mounted read-only at /pki.
RUN mkdir -p /data /pki && chown node:node /data
USER node
ENV FLEETHUB_PRODUCTION=1 FLEETHUB_HOST=0.0.0.0 FLEETHUB_DATA_DIR=/data FLEETHUB_CERTS_DIR=/pki
EXPOSE 4000 4001 4002
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.FLEETHUB_API_PORT || 4000) + '/readyz').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
CMD ["node", "bin/fleethub.js", "serve"]
