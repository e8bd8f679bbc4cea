import { defineConfig } from "vite";

// The gateway serves `dist/` at `/`; `npm run dev` proxies the API to a local gateway.
const gateway = process.env.CLICKPULSE_GATEWAY ?? "http://127.0.0.1:8080";

export default defineConfig({
  build: { outDir: "dist", emptyOutDir: true, chunkSizeWarningLimit: 1200 },
  server: {
    proxy: {
      "/ws": { target: gateway.replace(/^http/, "ws"), ws: true },
      "/admin": gateway,
    },
  },
});
