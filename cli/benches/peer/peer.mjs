// The peer of `scripts/bench gateway`: a plain `ws` broadcast server, no auth, no state.
// Every text message from a client connected at /pub goes to every other client.
// Usage: node peer.mjs PORT  -- prints {"port": P, "pid": N} once listening.
import { WebSocketServer } from 'ws';

const port = Number(process.argv[2] ?? 0);
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });
wss.on('connection', (ws, req) => {
  if (req.url === '/pub') {
    ws.on('message', (data) => {
      for (const client of wss.clients) {
        if (client !== ws && client.readyState === 1) client.send(data, { binary: false });
      }
    });
  }
  ws.on('error', () => {});
});
wss.on('listening', () => {
  console.log(JSON.stringify({ port: wss.address().port, pid: process.pid }));
});
