FROM node:20-bookworm-slim
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund
COPY . .
ENV FLEETHUB_HOST=0.0.0.0 FLEETHUB_DATA_DIR=/data
EXPOSE 4000 4001 4002
CMD ["node", "bin/fleethub.js", "serve"]
