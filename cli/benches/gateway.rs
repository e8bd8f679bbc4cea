//! `scripts/bench gateway`: the gateway under many WebSocket clients, against a peer.
//!
//! This process is the load generator: the gateway (`clickpulse gateway`, registering every
//! client in a private ZooKeeper) and the peer (a plain Node.js `ws` broadcast server, no auth,
//! `cli/benches/peer/peer.mjs`) run as processes of their own, and the same load goes to each in
//! turn over loopback:
//!
//! - idle memory: `CLIENTS` connections, 256 opening at a time, to the server just started;
//!   its RSS growth (`/proc/PID/status`) with all of them connected and quiet, divided by their
//!   number;
//! - connects: those clients closed and the server (and the gateway's ZooKeeper) idle again,
//!   `CLIENTS` connections once more, 256 opening at a time: the connect rate of a server with
//!   its JIT warm-up (ZooKeeper's JVM, the peer's V8) behind it, as one in service has. One
//!   counts when it is usable — for the gateway when its welcome arrives (token checked, client
//!   registered in ZooKeeper and subscribed to the `topn` stream, asked for in the upgrade
//!   request as the dashboard does), for the peer when the handshake completes. The first
//!   storm's rate is printed too (`connected cold`), and the CPU each process took per client,
//!   for the close storm between the two (the gateway deregisters each client) and for the
//!   second storm;
//! - fan-out, to the second storm's clients: `UPDATES` results go in at `RATE` per second (to
//!   the gateway over ZeroMQ, as an engine sends them; to the peer over a publisher WebSocket)
//!   and each client's receive time is taken against the send time. The peer gets the very
//!   text the gateway sends its clients, so each delivery is the same size on both. The
//!   clients are read by two plain threads that never sleep inside `epoll_wait`, so that the
//!   server's writes do not also pay for waking them (see [`readers`]).
//!
//! Then the same fan-out against a **floor**: this binary again (`--floor-server PORT`), a
//! server that does nothing but one blocking `write(2)` of a ready frame per client, from two
//! threads (no tasks, queues, timers or wake-ups; see [`floor`]). Its delivery times are the
//! least any server could reach with this load generator on this machine, and are printed
//! (`floor: …`) beside the others.
//!
//! Last line, one JSON object: `{"idle_connections", "rss_bytes_per_connection",
//! "fanout_clients", "updates_per_sec", "delivery_ms_p50", "delivery_ms_p99",
//! "connects_per_sec", "peer_rss_bytes_per_connection", "peer_delivery_ms_p99",
//! "peer_connects_per_sec"}`; `updates_per_sec` counts deliveries to clients per second during
//! the fan-out. `CLICKPULSE_BENCH_CLIENTS` lowers the client count (the default, 10,000, needs
//! an open-file limit above it).
#![allow(clippy::unwrap_used)] // a benchmark that cannot run should stop loudly
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clickpulse_gateway::auth::{TokenKey, now_secs};
use clickpulse_protocol::Tenant;
use clickpulse_protocol::results::{PageCount, ResultBody, ResultMsg};
use clickpulse_protocol::zk::Right;
use clickpulse_protocol::zmq::ResultFrame;
use clickpulse_tests::process::{Daemon, free_port};
use clickpulse_tests::{ZkOptions, ZooKeeper, unique_name};
use futures_util::{StreamExt, stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use zeromq::{PushSocket, Socket, SocketSend, ZmqMessage};

const CLIENTS: usize = 10_000;
const CONNECTING_AT_ONCE: usize = 256;
/// How long one client may take to open (a server that stopped accepting fails the run).
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
const UPDATES: u64 = 40;
const RATE: f64 = 10.0;
const SECRET: &str = "a bench secret of at least 32 bytes!";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == floor::ARG) {
        let port = args.get(at + 1).and_then(|p| p.parse().ok());
        floor::serve(port.expect("--floor-server PORT"));
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench());
}

/// What one server measured.
#[derive(Debug)]
struct Figures {
    connects_per_sec: f64,
    cold_connects_per_sec: f64,
    rss_bytes_per_connection: f64,
    deliveries_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// How the load reaches a server.
enum Server {
    Gateway {
        addr: SocketAddr,
        zmq: String,
        token: String,
    },
    Peer {
        addr: SocketAddr,
    },
}

impl Server {
    fn addr(&self) -> SocketAddr {
        match self {
            Server::Gateway { addr, .. } | Server::Peer { addr } => *addr,
        }
    }
}

/// A minimal WebSocket client: the load generator must cost as little as it can, so that
/// what is measured is the server (a full client library per connection was measured to be
/// the bottleneck at 100,000 deliveries per second). Server frames are unmasked and, here,
/// never fragmented; pings are answered.
struct Ws {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

/// What the next frame of a [`Ws`] was.
enum Frame {
    /// A text frame, at `buf[range]`.
    Text(std::ops::Range<usize>),
    Closed,
}

impl Ws {
    async fn connect(addr: SocketAddr, path: &str) -> std::io::Result<Ws> {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut ws = Ws {
            stream,
            buf: vec![0; 4096],
            start: 0,
            end: 0,
        };
        loop {
            if let Some(at) = ws.buf[..ws.end].windows(4).position(|w| w == b"\r\n\r\n") {
                if !ws.buf.starts_with(b"HTTP/1.1 101") {
                    let head = String::from_utf8_lossy(&ws.buf[..at]).into_owned();
                    return Err(std::io::Error::other(format!("no upgrade: {head}")));
                }
                ws.start = at + 4;
                return Ok(ws);
            }
            ws.fill().await?;
        }
    }

    /// Reads more bytes, compacting or growing the buffer first.
    async fn fill(&mut self) -> std::io::Result<()> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.end += n;
        Ok(())
    }

    /// The next text frame (pings answered on the way).
    async fn next(&mut self) -> std::io::Result<Frame> {
        loop {
            if let Some((opcode, payload)) = parse_frame(&self.buf[..self.end], self.start) {
                self.start = payload.end;
                match opcode {
                    0x1 => return Ok(Frame::Text(payload)),
                    0x8 => return Ok(Frame::Closed),
                    0x9 => {
                        let pong = masked_frame(0xA, &self.buf[payload]);
                        self.stream.write_all(&pong).await?;
                    }
                    _ => {}
                }
                continue;
            }
            self.fill().await?;
        }
    }

    /// Sends a masked frame.
    async fn send(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(&masked_frame(opcode, payload)).await
    }

    fn text(&self, range: &std::ops::Range<usize>) -> &[u8] {
        &self.buf[range.clone()]
    }
}

/// The frame at `buf[from..]` when all of it is there: its opcode and its payload's range
/// in `buf`. Server frames are unmasked and, here, never fragmented.
fn parse_frame(buf: &[u8], from: usize) -> Option<(u8, std::ops::Range<usize>)> {
    let avail = buf.get(from..)?;
    let (&first, rest) = avail.split_first()?;
    let (len, header): (usize, usize) = match rest.first()? & 0x7f {
        126 => (
            usize::from(u16::from_be_bytes(avail.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => {
            let be: [u8; 8] = avail.get(2..10)?.try_into().ok()?;
            (usize::try_from(u64::from_be_bytes(be)).ok()?, 10)
        }
        short => (usize::from(short), 2),
    };
    let end = header.checked_add(len)?;
    (avail.len() >= end).then_some((first & 0x0f, from + header..from + end))
}

/// A masked client frame (clients must mask; the key's value does not matter here).
fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5a, 0x17, 0xc3, 0x8e];
    let mut frame = Vec::with_capacity(payload.len() + 14);
    frame.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

async fn bench() {
    let clients = clients();
    let dir = tempfile::tempdir().unwrap();

    let gateway = {
        let zk = ZooKeeper::start_private(ZkOptions::default()).unwrap();
        let (http, zmq) = (free_port().unwrap(), free_port().unwrap());
        let mut command = Command::new(env!("CARGO_BIN_EXE_clickpulse"));
        command
            .args(["gateway", "--id", "gw-bench", "--listen"])
            .arg(format!("127.0.0.1:{http}"))
            .arg("--zmq-bind")
            .arg(format!("tcp://127.0.0.1:{zmq}"))
            .args(["--zookeeper", zk.connect_string(), "--zk-root"])
            .arg(format!("/{}", unique_name("bench")))
            .args(["--secret", SECRET])
            .env("RUST_LOG", "warn");
        let mut daemon =
            Daemon::spawn("gateway", command, &dir.path().join("gateway.log")).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
        daemon
            .wait_ready(Duration::from_secs(30), || ready(&addr))
            .unwrap();
        let tenant = Tenant::new("acme").unwrap();
        let token = TokenKey::new(SECRET.as_bytes()).unwrap().mint(
            &tenant,
            "bench",
            &[Right::View],
            now_secs(),
            3_600,
        );
        let server = Server::Gateway {
            addr,
            zmq: format!("tcp://127.0.0.1:{zmq}"),
            token,
        };
        let procs = [("gateway", daemon.pid()), ("ZooKeeper", zk.pid().unwrap())];
        let figures = measure("gateway", &server, &procs, clients, true).await;
        drop(daemon);
        drop(zk);
        figures
    };

    let peer = measure_peer("peer", node_peer(), clients, true).await;
    let mut floor = Command::new(std::env::current_exe().unwrap());
    floor.args([floor::ARG, &free_port().unwrap().to_string()]);
    // One storm: the floor never reads its clients, so it would not see the first ones close.
    let floor = measure_peer("floor", floor, clients, false).await;

    eprintln!("gateway: {gateway:?}");
    eprintln!("peer:    {peer:?}");
    eprintln!(
        "floor:   delivery p50 {:.1} ms, p99 {:.1} ms (one write per client and nothing else)",
        floor.p50_ms, floor.p99_ms
    );
    eprintln!(
        "connects/s, first storm (cold) and second (counted): gateway {:.0} and {:.0}, peer {:.0} and {:.0}",
        gateway.cold_connects_per_sec,
        gateway.connects_per_sec,
        peer.cold_connects_per_sec,
        peer.connects_per_sec
    );
    println!(
        "{}",
        serde_json::json!({
            "idle_connections": clients,
            "rss_bytes_per_connection": gateway.rss_bytes_per_connection.round(),
            "fanout_clients": clients,
            "updates_per_sec": gateway.deliveries_per_sec.round(),
            "delivery_ms_p50": round1(gateway.p50_ms),
            "delivery_ms_p99": round1(gateway.p99_ms),
            "connects_per_sec": gateway.connects_per_sec.round(),
            "peer_rss_bytes_per_connection": peer.rss_bytes_per_connection.round(),
            "peer_delivery_ms_p99": round1(peer.p99_ms),
            "peer_connects_per_sec": peer.connects_per_sec.round(),
        })
    );
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The client count: `CLICKPULSE_BENCH_CLIENTS` or 10,000, lowered to what the open-file limit
/// allows (each client is a socket here and one in the server).
fn clients() -> usize {
    let wanted = std::env::var("CLICKPULSE_BENCH_CLIENTS")
        .ok()
        .map(|v| {
            v.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .unwrap_or_else(|| {
                    panic!("CLICKPULSE_BENCH_CLIENTS must be a positive count, not {v:?}")
                })
        })
        .unwrap_or(CLIENTS);
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse::<usize>().ok())
        })
        .unwrap_or(1024);
    let allowed = limit.saturating_sub(200);
    if wanted > allowed {
        eprintln!(
            "open-file limit {limit}: {allowed} clients instead of {wanted} (raise it with `ulimit -n`)"
        );
    }
    wanted.min(allowed)
}

/// `GET /readyz` answers 200: ZooKeeper session and ZeroMQ socket up.
fn ready(addr: &SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /readyz HTTP/1.0\r\nHost: bench\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

/// The Node.js peer's command line (installing its one package first when needed).
fn node_peer() -> Command {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/peer");
    if !dir.join("node_modules/ws").exists() {
        eprintln!("bench: installing the peer's npm package (ws)");
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm, to install the peer (scripts/setup installs Node.js)");
        assert!(status.success(), "npm ci in {} failed", dir.display());
    }
    let mut command = Command::new("node");
    command
        .arg(dir.join("peer.mjs"))
        .arg(free_port().unwrap().to_string());
    command
}

/// Measures a server speaking the peer's protocol, started by `command`, then stops it.
async fn measure_peer(name: &str, command: Command, clients: usize, twice: bool) -> Figures {
    let (mut child, port) = start_peer(command);
    let server = Server::Peer {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    };
    let figures = measure(name, &server, &[(name, child.id())], clients, twice).await;
    let _ = child.kill();
    let _ = child.wait();
    figures
}

/// Starts a server speaking the peer's protocol, which prints `{"port": P, "pid": N}` once
/// listening; returns it and its port.
fn start_peer(mut command: Command) -> (std::process::Child, u16) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let started: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("{command:?} printed {line:?}, not its port: {e}"));
    (child, started["port"].as_u64().unwrap() as u16)
}

/// The floor: the least a fan-out server can do per delivery. Clients at any path but `/pub`
/// are dealt to two sender threads in turn; each text frame a `/pub` client sends is built
/// once as a server frame and written, blocking, to every client by both threads (half
/// each). The upgrade answer skips `Sec-WebSocket-Accept` (the load generator does not check
/// it), pings are never sent, a client that fails a write is dropped. Not a server anyone
/// should run: nothing bounds a slow client here.
mod floor {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex, mpsc};

    pub const ARG: &str = "--floor-server";
    const SENDERS: usize = 2;

    pub fn serve(port: u16) {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        println!(r#"{{"port":{port},"pid":{}}}"#, std::process::id());
        let mut clients: Vec<Arc<Mutex<Vec<TcpStream>>>> = Vec::new();
        let mut senders: Vec<mpsc::Sender<Arc<Vec<u8>>>> = Vec::new();
        for _ in 0..SENDERS {
            let mine = Arc::new(Mutex::new(Vec::<TcpStream>::new()));
            let (tx, rx) = mpsc::channel::<Arc<Vec<u8>>>();
            let list = mine.clone();
            std::thread::spawn(move || {
                for frame in rx {
                    list.lock()
                        .unwrap()
                        .retain_mut(|client| client.write_all(&frame).is_ok());
                }
            });
            clients.push(mine);
            senders.push(tx);
        }
        let senders = Arc::new(senders);
        for (n, stream) in listener.incoming().enumerate() {
            let mut stream = match stream {
                Ok(stream) => stream,
                Err(error) => {
                    // Out of files, say: not a busy loop on the two cores being measured.
                    eprintln!("floor: accept: {error}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let Some(head) = request_head(&mut stream) else {
                continue;
            };
            let upgraded = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
            if stream.write_all(upgraded).is_err() {
                continue;
            }
            if head.starts_with(b"GET /pub ") {
                let senders = senders.clone();
                std::thread::spawn(move || {
                    while let Some(frame) = read_text(&mut stream) {
                        let frame = Arc::new(frame);
                        for sender in senders.iter() {
                            let _ = sender.send(frame.clone());
                        }
                    }
                });
            } else {
                clients[n % SENDERS].lock().unwrap().push(stream);
            }
        }
    }

    fn request_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).ok()? == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        Some(head)
    }

    /// Reads one masked client frame; returns it as an unmasked server text frame.
    fn read_text(stream: &mut TcpStream) -> Option<Vec<u8>> {
        let mut header = [0u8; 2];
        stream.read_exact(&mut header).ok()?;
        let len = match header[1] & 0x7f {
            126 => {
                let mut be = [0u8; 2];
                stream.read_exact(&mut be).ok()?;
                usize::from(u16::from_be_bytes(be))
            }
            127 => {
                let mut be = [0u8; 8];
                stream.read_exact(&mut be).ok()?;
                usize::try_from(u64::from_be_bytes(be)).ok()?
            }
            short => usize::from(short),
        };
        let mut mask = [0u8; 4];
        stream.read_exact(&mut mask).ok()?;
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).ok()?;
        let mut frame = vec![0x81];
        match len {
            n if n < 126 => frame.push(n as u8),
            n if n <= 0xffff => {
                frame.push(126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        Some(frame)
    }
}

/// The fan-out's clients, read on plain threads (no tasks, no runtime).
///
/// On loopback the server's `write` runs the client's TCP input and, when the reading
/// thread sleeps in `epoll_wait`, its wake-up too: the kernel's cross-core wake-up, paid by
/// the server under test, where a remote client's would be paid on the client's machine. So
/// a reader here never sleeps in `epoll_wait`: it asks it what is ready without waiting, and
/// when nothing is, naps for [`NAP`] outside it. Sleeping that way, nobody waits on the
/// sockets and the server's writes wake nobody; a delivery is seen at most a nap late.
///
/// Each reader thread takes its share of the clients and reads each socket once per readiness
/// edge: a read that returns less than there was room for has emptied the socket (the next
/// bytes raise a new edge), so there is no second read to learn that it would block.
mod readers {
    use std::io::{ErrorKind, Read, Write};
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use mio::{Events, Interest, Poll, Token};

    use super::{Fanout, UPDATES, Ws, masked_frame, parse_frame, seq_of};

    pub const THREADS: usize = 2;
    /// How long a reader with nothing ready sleeps before it asks again.
    const NAP: Duration = Duration::from_micros(250);

    /// One client: its socket and what it has read but not parsed.
    struct Client {
        stream: mio::net::TcpStream,
        buf: Vec<u8>,
        end: usize,
        latencies: Vec<u32>,
        warmed: bool,
        done: bool,
    }

    /// What a reader thread hands back: the measured deliveries (µs), its latest receive
    /// time (ns after the fan-out's base), and its sockets, closed only once every client
    /// is done (see [`super::measure`]).
    pub struct Taken {
        pub latencies: Vec<u32>,
        pub last_ns: u64,
        pub sockets: Vec<mio::net::TcpStream>,
    }

    /// Starts [`THREADS`] readers, the clients dealt to them in turn.
    pub fn spawn(clients: Vec<Ws>, fanout: &Arc<Fanout>) -> Vec<JoinHandle<Taken>> {
        let mut shares: Vec<Vec<Client>> = (0..THREADS).map(|_| Vec::new()).collect();
        for (i, ws) in clients.into_iter().enumerate() {
            let Ws {
                stream,
                mut buf,
                start,
                end,
            } = ws;
            // What came after the welcome (snapshots) is read first, as the async client would.
            buf.copy_within(start..end, 0);
            let stream = stream.into_std().unwrap();
            shares[i % THREADS].push(Client {
                stream: mio::net::TcpStream::from_std(stream),
                buf,
                end: end - start,
                latencies: Vec::with_capacity(UPDATES as usize),
                warmed: false,
                done: false,
            });
        }
        shares
            .into_iter()
            .map(|share| {
                let fanout = fanout.clone();
                std::thread::spawn(move || read(share, &fanout))
            })
            .collect()
    }

    fn read(mut clients: Vec<Client>, fanout: &Fanout) -> Taken {
        let mut poll = Poll::new().unwrap();
        for (i, client) in clients.iter_mut().enumerate() {
            poll.registry()
                .register(&mut client.stream, Token(i), Interest::READABLE)
                .unwrap();
        }
        let mut last_ns = 0;
        // Bytes already here (after the welcome) first.
        for client in &mut clients {
            client.parse(fanout, &mut last_ns);
        }
        let mut open = clients.iter().filter(|c| !c.done).count();
        let mut events = Events::with_capacity(1024);
        while open > 0 && !fanout.stop.is_cancelled() {
            poll.poll(&mut events, Some(Duration::ZERO)).unwrap();
            if events.is_empty() {
                std::thread::sleep(NAP);
                continue;
            }
            for event in &events {
                let client = &mut clients[event.token().0];
                if client.done {
                    continue;
                }
                client.receive(fanout, &mut last_ns);
                if client.done {
                    open -= 1;
                }
            }
        }
        let mut latencies = Vec::with_capacity(clients.len() * UPDATES as usize);
        let mut sockets = Vec::with_capacity(clients.len());
        for client in clients {
            latencies.extend(client.latencies);
            sockets.push(client.stream);
        }
        Taken {
            latencies,
            last_ns,
            sockets,
        }
    }

    impl Client {
        /// Reads what the socket has (all of it: see the module docs) and parses it.
        fn receive(&mut self, fanout: &Fanout, last_ns: &mut u64) {
            loop {
                if self.end == self.buf.len() {
                    self.buf.resize(self.buf.len() * 2, 0);
                }
                let room = self.buf.len() - self.end;
                match self.stream.read(&mut self.buf[self.end..]) {
                    Ok(0) => {
                        self.done = true;
                        return;
                    }
                    Ok(n) => {
                        self.end += n;
                        self.parse(fanout, last_ns);
                        if n < room || self.done {
                            return;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.done = true;
                        return;
                    }
                }
            }
        }

        /// Takes every whole frame out of the buffer.
        fn parse(&mut self, fanout: &Fanout, last_ns: &mut u64) {
            let mut start = 0;
            while let Some((opcode, payload)) = parse_frame(&self.buf[..self.end], start) {
                start = payload.end;
                match opcode {
                    0x1 => self.done = self.on_text(payload, fanout, last_ns),
                    0x8 => self.done = true,
                    // A pong is a few bytes into an empty send buffer: it goes at once or
                    // the connection is broken, which the next read says.
                    0x9 => {
                        let _ = self.stream.write(&masked_frame(0xA, &self.buf[payload]));
                    }
                    _ => {}
                }
                if self.done {
                    return;
                }
            }
            self.buf.copy_within(start..self.end, 0);
            self.end -= start;
        }

        /// A text frame: its delivery time, if it is a measured update; true after the last.
        fn on_text(
            &mut self,
            payload: std::ops::Range<usize>,
            fanout: &Fanout,
            last_ns: &mut u64,
        ) -> bool {
            let Some(seq) = seq_of(&self.buf[payload]) else {
                return false;
            };
            let now = fanout.base.elapsed().as_nanos() as u64;
            if !self.warmed {
                self.warmed = true;
                fanout.warmed.fetch_add(1, Ordering::Relaxed);
            }
            if !(1..=UPDATES).contains(&seq) {
                return false;
            }
            let sent = fanout.sent_ns[seq as usize].load(Ordering::Acquire);
            self.latencies
                .push((now.saturating_sub(sent) / 1_000) as u32);
            *last_ns = (*last_ns).max(now);
            seq == UPDATES
        }
    }
}

/// Resident set size of a process, bytes.
fn rss(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb * 1024
}

/// Waits until every process of `pids` has been all but idle (under 2 % of a core) for half
/// a second, at most 30 s; returns how long that took.
async fn settle(pids: &[u32]) -> f64 {
    let started = Instant::now();
    let busy = || pids.iter().map(|&pid| cpu_secs(pid)).sum::<f64>();
    let mut last = busy();
    let mut quiet = 0;
    while quiet < 2 && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = busy();
        quiet = if now - last <= 0.005 * pids.len() as f64 {
            quiet + 1
        } else {
            0
        };
        last = now;
    }
    started.elapsed().as_secs_f64()
}

/// CPU time a process has used, seconds (user + system; Linux counts it in 1/100 s).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The result the gateway gets as update `seq`, and the text it sends its clients for it.
fn update(seq: u64) -> (ResultMsg, String) {
    let msg = ResultMsg {
        tenant: Tenant::new("acme").unwrap(),
        epoch: 1,
        run: 1,
        seq,
        window_start_ms: 938_563_200_000 + seq as i64 * 10_000,
        window_end_ms: 938_563_500_000 + seq as i64 * 10_000,
        watermark_ms: 938_563_500_000 + seq as i64 * 10_000,
        body: ResultBody::TopN {
            n: 10,
            pages: [
                "frontpage",
                "news",
                "tech",
                "local",
                "opinion",
                "on-air",
                "misc",
                "weather",
                "msn-news",
                "health",
            ]
            .iter()
            .enumerate()
            .map(|(i, page)| PageCount {
                page: (*page).into(),
                views: 10_000 - i as u64 * 700 + seq,
            })
            .collect(),
        },
    };
    let text = format!(
        r#"{{"type":"result","snapshot":false,"result":{}}}"#,
        serde_json::to_string(&msg).unwrap()
    );
    (msg, text)
}

/// The `seq` of a result text, without parsing all of it (the same work for both servers).
fn seq_of(text: &[u8]) -> Option<u64> {
    let key = br#""seq":"#;
    let at = text.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit());
    digits
        .map(|&b| u64::from(b - b'0'))
        .try_fold(None, |acc: Option<u64>, d| {
            Some(Some(acc.unwrap_or(0).checked_mul(10)?.checked_add(d)?))
        })
        .flatten()
}

/// Opens one client; for the gateway, subscribed in the upgrade request as the dashboard is,
/// until its welcome.
async fn open(server: &Server) -> Result<Ws, String> {
    let path = match server {
        Server::Gateway { token, .. } => format!("/ws?token={token}&streams=topn"),
        Server::Peer { .. } => "/".to_owned(),
    };
    let mut ws = Ws::connect(server.addr(), &path)
        .await
        .map_err(|e| e.to_string())?;
    if let Server::Gateway { .. } = server {
        loop {
            match ws.next().await.map_err(|e| e.to_string())? {
                Frame::Text(range) if ws.text(&range).starts_with(br#"{"type":"welcome""#) => break,
                Frame::Text(_) => {}
                Frame::Closed => return Err("closed before the welcome".into()),
            }
        }
    }
    Ok(ws)
}

/// Shared between the publisher and the clients of one fan-out.
struct Fanout {
    base: Instant,
    /// Send time of each update, ns after `base` (0: not sent yet).
    sent_ns: Vec<AtomicU64>,
    /// Clients that received anything (the warm-up).
    warmed: AtomicUsize,
    stop: CancellationToken,
}

/// Sends updates to a server: over ZeroMQ as an engine, or over the peer's publisher socket.
enum Publisher {
    Zmq(PushSocket),
    Ws(Box<Ws>),
}

impl Publisher {
    async fn connect(server: &Server) -> Publisher {
        match server {
            Server::Gateway { zmq, .. } => {
                let mut push = PushSocket::new();
                push.connect(zmq).await.unwrap();
                Publisher::Zmq(push)
            }
            Server::Peer { addr } => {
                Publisher::Ws(Box::new(Ws::connect(*addr, "/pub").await.unwrap()))
            }
        }
    }

    async fn send(&mut self, seq: u64) {
        let (msg, text) = update(seq);
        match self {
            Publisher::Zmq(push) => {
                let frames: Vec<bytes::Bytes> = ResultFrame::from_result(&msg)
                    .encode()
                    .into_iter()
                    .map(Into::into)
                    .collect();
                push.send(ZmqMessage::try_from(frames).unwrap())
                    .await
                    .unwrap();
            }
            Publisher::Ws(ws) => ws.send(0x1, text.as_bytes()).await.unwrap(),
        }
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1]) / 1_000.0
}

/// Opens `n` clients, `CONNECTING_AT_ONCE` at a time; returns them and the connects per second.
async fn storm(name: &str, server: &Server, n: usize) -> (Vec<Ws>, f64) {
    let started = Instant::now();
    let opened: Vec<Result<Ws, String>> = stream::iter(0..n)
        .map(|_| async {
            tokio::time::timeout(OPEN_TIMEOUT, open(server))
                .await
                .unwrap_or_else(|_| Err(format!("not open within {OPEN_TIMEOUT:?}")))
        })
        .buffer_unordered(CONNECTING_AT_ONCE)
        .collect()
        .await;
    let secs = started.elapsed().as_secs_f64();
    let failed: Vec<&String> = opened.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{name}: {} of {n} connections failed, e.g. {}",
        failed.len(),
        failed[0]
    );
    let sockets = opened.into_iter().map(Result::unwrap).collect();
    (sockets, n as f64 / secs)
}

/// Measures one server, the first of `procs` (named processes; for the gateway its ZooKeeper
/// too). With `twice`, the connects and the fan-out are those of a second storm, once the
/// first one's clients are closed and every process of `procs` is idle again.
async fn measure(
    name: &str,
    server: &Server,
    procs: &[(&str, u32)],
    n: usize,
    twice: bool,
) -> Figures {
    let pid = procs[0].1;
    let pids: Vec<u32> = procs.iter().map(|(_, pid)| *pid).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss(pid);

    // The first storm, on a server just started: its memory for idle clients, and the cold
    // connect rate (printed, not a figure of the last line).
    let (sockets, cold_connects_per_sec) = storm(name, server, n).await;
    eprintln!("{name}: {n} clients connected cold ({cold_connects_per_sec:.0}/s)");

    // Quiet for a moment: what the server holds for idle clients.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss(pid);
    let rss_bytes_per_connection = rss_after.saturating_sub(rss_before) as f64 / n as f64;
    eprintln!(
        "{name}: RSS {:.1} MB -> {:.1} MB, {rss_bytes_per_connection:.0} B per idle connection",
        rss_before as f64 / 1e6,
        rss_after as f64 / 1e6
    );

    // All closed, the servers idle again, then the storm that counts: a server in service
    // has its JIT warm-up (ZooKeeper's JVM, the peer's V8) and its first allocations behind
    // it. The fan-out goes to these clients.
    let (sockets, connects_per_sec) = if twice {
        let per_client = |before: &[f64]| -> String {
            procs
                .iter()
                .zip(before)
                .map(|((what, pid), before)| {
                    format!(
                        "{what} {:.0} µs",
                        (cpu_secs(*pid) - before) * 1e6 / n as f64
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let cpu_before: Vec<f64> = pids.iter().map(|&pid| cpu_secs(pid)).collect();
        drop(sockets);
        let settled = settle(&pids).await;
        // The close storm's CPU (a deregistration per client for the gateway), counted from
        // the drop to quiet: the idle half second at its end adds under 1 µs.
        let closes = per_client(&cpu_before);
        let cpu_before: Vec<f64> = pids.iter().map(|&pid| cpu_secs(pid)).collect();
        let own_before = cpu_secs(std::process::id());
        let (sockets, connects_per_sec) = storm(name, server, n).await;
        eprintln!(
            "{name}: closed, quiet after {settled:.1} s; {n} clients connected again ({connects_per_sec:.0}/s)"
        );
        eprintln!("{name}: CPU per close: {closes}");
        eprintln!(
            "{name}: CPU per connect: {}, load generator {:.0} µs",
            per_client(&cpu_before),
            (cpu_secs(std::process::id()) - own_before) * 1e6 / n as f64
        );
        (sockets, connects_per_sec)
    } else {
        (sockets, cold_connects_per_sec)
    };

    let fanout = Arc::new(Fanout {
        base: Instant::now(),
        sent_ns: (0..=UPDATES).map(|_| AtomicU64::new(0)).collect(),
        warmed: AtomicUsize::new(0),
        stop: CancellationToken::new(),
    });
    let readers = readers::spawn(sockets, &fanout);
    let mut publisher = Publisher::connect(server).await;

    // Warm-up: update 0 until every client has one (subscriptions are in place).
    let warm_deadline = Instant::now() + Duration::from_secs(60);
    while fanout.warmed.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < warm_deadline,
            "{name}: only {} of {n} clients got the warm-up update within 60 s",
            fanout.warmed.load(Ordering::Relaxed)
        );
        publisher.send(0).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let cpu_before = (cpu_secs(pid), cpu_secs(std::process::id()));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / RATE));
    let first_sent = fanout.base.elapsed().as_nanos() as u64;
    for seq in 1..=UPDATES {
        tick.tick().await;
        let now = fanout.base.elapsed().as_nanos() as u64;
        fanout.sent_ns[seq as usize].store(now.max(1), Ordering::Release);
        publisher.send(seq).await;
    }
    // Deliveries still under way finish; bounded.
    let stopper = {
        let stop = fanout.stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(20)).await;
            stop.cancel();
        })
    };
    let mut latencies: Vec<u32> = Vec::with_capacity(n * UPDATES as usize);
    let mut last_ns = 0;
    // Sockets are closed only once every client is done, or the first ones to finish would
    // close theirs while the last update still goes to the rest (10,000 closes and
    // deregistrations, measured as that update's p99 of 320 ms when the others' was 80–95 ms).
    let mut done = Vec::with_capacity(n);
    for reader in readers {
        let read = tokio::task::spawn_blocking(move || reader.join().unwrap())
            .await
            .unwrap();
        latencies.extend(read.latencies);
        last_ns = last_ns.max(read.last_ns);
        done.push(read.sockets);
    }
    stopper.abort();
    // Not a figure of the last line, but what a server holds for clients that have had
    // results (buffers and queues grown to a result's size, kept for the next one).
    let rss_busy = rss(pid);
    eprintln!(
        "{name}: RSS after the fan-out, clients still connected: {:.1} MB, {:.0} B per connection",
        rss_busy as f64 / 1e6,
        rss_busy.saturating_sub(rss_before) as f64 / n as f64
    );
    drop(done);
    eprintln!(
        "{name}: CPU during the fan-out: server {:.1} s, load generator {:.1} s",
        cpu_secs(pid) - cpu_before.0,
        cpu_secs(std::process::id()) - cpu_before.1
    );
    latencies.sort_unstable();
    let delivered = latencies.len();
    let span_secs = last_ns.saturating_sub(first_sent) as f64 / 1e9;
    let figures = Figures {
        connects_per_sec,
        cold_connects_per_sec,
        rss_bytes_per_connection,
        deliveries_per_sec: delivered as f64 / span_secs.max(f64::EPSILON),
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
    };
    eprintln!(
        "{name}: {delivered} of {} updates delivered ({:.1} %), p50 {:.1} ms, p99 {:.1} ms",
        n * UPDATES as usize,
        100.0 * delivered as f64 / (n * UPDATES as usize) as f64,
        figures.p50_ms,
        figures.p99_ms
    );
    figures
}
