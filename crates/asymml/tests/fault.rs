//! The fault suite: hostile peers on both sides of the trust boundary.
//!
//! - A hostile client against a real `asymml accelerator` process: absurd registrations, length prefixes just
//!   under the frame limit with nothing after them, a stray HTTP request, slow senders, many idle connections,
//!   abrupt closes mid-frame. The accelerator must stay up, keep its peak resident memory (VmHWM) under
//!   [`PEAK_RSS_BOUND_MB`], close what it should within its timeouts, and train a legitimate client afterwards.
//!   Run with fewer file descriptors than connections, it logs each failed `accept()`, retries, and serves again.
//! - A hostile accelerator (a listener in this test that does the handshake, answers `Register`, then stalls,
//!   sends a ~1 GiB length prefix and nothing, or closes mid-reply) against `asymml train
//!   --accelerator-timeout 2`: exit code 2 with one clear error line within 30 s, never a panic, and a resumed
//!   run's checkpoint left byte-identical.
//!
//! Both over plaintext TCP (`--insecure-plaintext-tcp`): the hostile peers speak the frames themselves.
//!
//! Every spawned process is killed when its guard drops, so a failing assertion leaves nothing behind.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use asymml_core::Tensor;
use asymml_protocol::{
    decode_reply, decode_request, encode_reply, encode_request, public_weights, ConvLayerSpec,
    Reply, Request, WireTensor, MAX_MESSAGE, PROTOCOL_VERSION,
};

/// The accelerator's peak resident memory under attack must stay below this (MB).
const PEAK_RSS_BOUND_MB: u64 = 400;

/// The accelerator's peak virtual size with the huge prefixes pending must stay below this (MB).
const VIRTUAL_BOUND_MB: u64 = 2048;

/// The accelerator's thread count with 50 idle connections must stay below this (8 connections at most, no
/// thread pool before a handshake).
const THREAD_BOUND: u64 = 40;

/// A length prefix just under the 1 GiB frame limit.
const HUGE_PREFIX: u32 = MAX_MESSAGE - 1;

// ---------------------------------------------------------------------------------------------------------------
// Processes.

/// A child process, killed and reaped when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `asymml accelerator` and everything it wrote on stderr so far.
struct Server {
    child: Killed,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `asymml accelerator` on a free loopback port with short timeouts and small limits, and waits for
    /// its "listening on tcp://…" line.
    fn start() -> Server {
        Server::start_with(None)
    }

    /// [`Server::start`], with at most `fd_limit` open files (`ulimit -n`) when given.
    fn start_with(fd_limit: Option<u32>) -> Server {
        let args = [
            "accelerator",
            "--listen",
            "127.0.0.1:0",
            "--accelerator-threads",
            "1",
            "--handshake-timeout",
            "2",
            "--idle-timeout",
            "3",
            "--max-session-bytes",
            "512M",
            "--max-connections",
            "8",
            // The hostile clients speak the frames themselves (TLS is tested in tls_cli.rs).
            "--insecure-plaintext-tcp",
        ];
        let mut command = match fd_limit {
            None => Command::new(env!("CARGO_BIN_EXE_asymml")),
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_asymml"));
                c
            }
        };
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start asymml accelerator");
        let mut child = Killed(child);
        let stderr = child.0.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let lines = log.clone();
        // Drains stderr for the server's whole life (a full pipe would block its logging).
        thread::spawn(move || {
            let mut reader = std::io::BufReader::new(stderr);
            let mut line = String::new();
            while std::io::BufRead::read_line(&mut reader, &mut line).is_ok_and(|n| n > 0) {
                let l = line.trim_end().to_string();
                if let Some(addr) = listening_address(&l) {
                    let _ = tx.send(addr);
                }
                lines.lock().unwrap().push(l);
                line.clear();
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => panic!(
                "the accelerator did not report its address: {}",
                log.lock().unwrap().join("\n")
            ),
        };
        Server { child, addr, log }
    }

    /// Panics (with the server's log) unless the process is still running.
    fn assert_alive(&mut self, after: &str) {
        if let Ok(Some(status)) = self.child.0.try_wait() {
            panic!(
                "the accelerator died after {after} ({status}); its log:\n{}",
                self.log()
            );
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// A field of /proc/PID/status, in its own unit (kB for memory).
    fn status_field(&self, field: &str) -> u64 {
        proc_status(self.child.0.id(), field)
            .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"))
    }

    /// Peak resident memory so far (VmHWM), in MB.
    fn peak_rss_mb(&self) -> u64 {
        self.status_field("VmHWM:") / 1024
    }

    fn threads(&self) -> u64 {
        self.status_field("Threads:")
    }
}

/// The address in "asymml accelerator: listening on tcp://127.0.0.1:PORT (…)".
fn listening_address(line: &str) -> Option<SocketAddr> {
    let rest = line.split("listening on ").nth(1)?;
    let addr = rest.split_whitespace().next()?;
    addr.trim_start_matches("tcp://").parse().ok()
}

/// A field of /proc/PID/status, in its own unit (kB for memory); `None` once the process is gone.
fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// A finished `asymml` command.
struct Run {
    out: Output,
    took: Duration,
    /// Its peak resident memory (VmHWM) as last seen while it ran, in MB.
    peak_rss_mb: u64,
}

/// Runs `asymml ARGS`, killing it after 120 s (a hang is a failure, not a stuck test).
fn asymml(args: &[&str]) -> Run {
    let t0 = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_asymml"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run asymml");
    let mut child = Killed(child);
    let mut out = child.0.stdout.take().unwrap();
    let mut err = child.0.stderr.take().unwrap();
    let stdout = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let stderr = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let mut peak_kb = 0;
    let status = loop {
        if let Some(hwm) = proc_status(child.0.id(), "VmHWM:") {
            peak_kb = peak_kb.max(hwm);
        }
        if let Some(status) = child.0.try_wait().expect("wait for asymml") {
            break status;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.0.kill();
            break child.0.wait().expect("wait for asymml");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let out = Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    Run {
        out,
        took: t0.elapsed(),
        peak_rss_mb: peak_kb / 1024,
    }
}

/// `asymml train` of one short epoch (128 images, batches of 32) into `out`, plus `more` flags.
fn train(out: &Path, more: &[&str]) -> Run {
    let mut args = vec![
        "train",
        "--epochs",
        "1",
        "--limit-train",
        "128",
        "--batch-size",
        "32",
        "--threads",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    asymml(&args)
}

// ---------------------------------------------------------------------------------------------------------------
// Frames over a raw socket.

fn tensor(shape: &[usize]) -> WireTensor {
    let n = shape.iter().product();
    public_weights(&Tensor {
        shape: shape.to_vec(),
        data: vec![0.01; n],
    })
}

fn request_frame(req: &Request) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_request(req, MAX_MESSAGE, &mut buf).expect("encode request");
    buf
}

fn reply_frame(rep: &Reply) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_reply(rep, MAX_MESSAGE, &mut buf).expect("encode reply");
    buf
}

fn hello() -> Request {
    Request::Hello {
        version: PROTOCOL_VERSION,
        max_message: MAX_MESSAGE,
    }
}

/// One frame (prefix included) from `s`; a prefix above `max` is an error, not an allocation.
fn read_frame(s: &mut impl Read, max: u32) -> std::io::Result<Vec<u8>> {
    let mut frame = vec![0u8; 4];
    s.read_exact(&mut frame)?;
    let n = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
    if n > max {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("a frame of {n} bytes"),
        ));
    }
    frame.resize(4 + n as usize, 0);
    s.read_exact(&mut frame[4..])?;
    Ok(frame)
}

/// A connection to the accelerator with 10 s read and write timeouts.
fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to the accelerator");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Sends `req` and returns the accelerator's reply.
fn call(s: &mut TcpStream, req: &Request) -> Reply {
    s.write_all(&request_frame(req)).expect("send a request");
    let frame = read_frame(s, 64 << 20).unwrap_or_else(|e| panic!("{}: {e}", req.describe()));
    decode_reply(&frame, MAX_MESSAGE).expect("decode the reply")
}

/// A connection past its handshake. A connection closed at once (the accelerator is at --max-connections while
/// it notices earlier ones are gone) is retried for up to 10 s.
fn handshaken(addr: SocketAddr) -> TcpStream {
    let t0 = Instant::now();
    loop {
        let mut s = connect(addr);
        let answered = s
            .write_all(&request_frame(&hello()))
            .and_then(|_| read_frame(&mut s, 4096));
        match answered {
            Ok(frame) => match decode_reply(&frame, MAX_MESSAGE).expect("decode HelloAck") {
                Reply::HelloAck { .. } => return s,
                other => panic!("handshake answered with {other:?}"),
            },
            Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                eprintln!("fault: handshake refused ({e}), retrying");
                thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("no handshake within 10 s: {e}"),
        }
    }
}

/// Reads whatever is there without blocking: `true` once the peer has closed (EOF or reset). Bytes that come
/// first (an error reply before the close) are skipped.
fn peer_closed(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break true,
        }
    };
    s.set_nonblocking(false).unwrap();
    closed
}

/// Waits until the accelerator has closed every connection in `streams` or `limit` has passed; returns how many
/// it closed.
fn wait_closed(streams: &mut [TcpStream], limit: Duration) -> usize {
    let t0 = Instant::now();
    let mut closed = vec![false; streams.len()];
    loop {
        for (s, c) in streams.iter_mut().zip(closed.iter_mut()) {
            if !*c {
                *c = peer_closed(s);
            }
        }
        let n = closed.iter().filter(|&&c| c).count();
        if n == streams.len() || t0.elapsed() > limit {
            return n;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `frame` one byte every 0.5 s; returns the seconds until the accelerator closed the connection, or
/// `None` if it was still open after `limit`.
fn slow_send(mut s: TcpStream, frame: &[u8], limit: Duration) -> Option<f64> {
    let t0 = Instant::now();
    for b in frame {
        if s.write_all(&[*b]).is_err() || peer_closed(&mut s) {
            return Some(t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > limit {
            return None;
        }
        thread::sleep(Duration::from_millis(500));
    }
    None
}

// ---------------------------------------------------------------------------------------------------------------
// The hostile client.

fn layer(out_ch: u32, in_ch: u32, k: u32, stride: u32, pad: u32) -> ConvLayerSpec {
    ConvLayerSpec {
        id: 0,
        in_ch,
        out_ch,
        k,
        stride,
        pad,
        bias: false,
    }
}

/// A registration with absurd geometry (or one within the limits whose convolutions need absurd memory), then
/// a `ConvForward` of a small input `x`: each request is answered (the registration may be refused), the conv
/// that would need absurd memory is refused with an error, and the session goes on: a conv of the tiny input
/// `then` (when the registration was taken) and a `Step` are answered.
fn absurd_registration(
    addr: SocketAddr,
    what: &str,
    spec: ConvLayerSpec,
    w: &[usize],
    x: &[usize],
    then: &[usize],
) {
    let mut s = handshaken(addr);
    let reg = call(
        &mut s,
        &Request::Register {
            layers: vec![spec],
            weights: vec![(tensor(w), None)],
        },
    );
    let forward = |x: &[usize]| Request::ConvForward {
        layer: 0,
        x_u: tensor(x),
        train: true,
    };
    let fwd = call(&mut s, &forward(x));
    eprintln!("fault: {what}: Register -> {reg:?}; ConvForward {x:?} -> {fwd:?}");
    assert!(
        matches!(fwd, Reply::Error { .. }),
        "{what}: the conv was not refused: {fwd:?}"
    );
    // The session continues.
    if reg == Reply::Ok {
        let small = call(&mut s, &forward(then));
        let got = match &small {
            Reply::ConvOutput { y_u, .. } => format!("ConvOutput {:?}", y_u.shape()),
            other => format!("{other:?}"),
        };
        eprintln!("fault: {what}: then ConvForward {then:?} -> {got}");
        assert!(
            matches!(small, Reply::ConvOutput { .. }),
            "{what}: the session did not go on: {got}"
        );
    }
    let step = call(&mut s, &Request::Step { lr: 0.1 });
    eprintln!("fault: {what}: then Step -> {step:?}");
}

#[test]
fn hostile_clients_leave_the_accelerator_up_within_memory_and_serving() {
    let mut server = Server::start();
    let addr = server.addr;
    eprintln!("fault: accelerator at {addr}");

    // Absurd registrations, each followed by a small ConvForward; then registrations within the limits whose
    // convolutions would need tens of GB (65536 output channels of 1×1 weights, 256 KB in all).
    let x8 = [1, 1, 8, 8];
    let tiny = [1, 1, 2, 2];
    let wide = layer(65_536, 1, 1, 1, 0);
    let cases: [(&str, ConvLayerSpec, &[usize], &[usize]); 6] = [
        ("pad 10^6", layer(1, 1, 3, 1, 1_000_000), &[1, 1, 3, 3], &x8),
        (
            "out_ch 10^6",
            layer(1_000_000, 1, 1, 1, 0),
            &[1_000_000, 1, 1, 1],
            &[1, 1, 100, 100],
        ),
        ("k 10^4", layer(1, 1, 10_000, 1, 5_000), &[1, 1, 1, 1], &x8),
        ("stride 0", layer(1, 1, 3, 0, 1), &[1, 1, 3, 3], &x8),
        (
            "out_ch 65536 on a 256x256 input (16 GB out)",
            wide,
            &[65_536, 1, 1, 1],
            &[1, 1, 256, 256],
        ),
        (
            "out_ch 65536 on a batch of 4096 (275 GB out)",
            wide,
            &[65_536, 1, 1, 1],
            &[4096, 1, 16, 16],
        ),
    ];
    for (what, spec, w, x) in cases {
        absurd_registration(addr, what, spec, w, x, &tiny);
    }
    server.assert_alive("absurd registrations");

    // A length prefix just under 1 GiB and nothing else: four before the handshake, four after it.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = handshaken(addr);
        s.write_all(&HUGE_PREFIX.to_le_bytes()).unwrap();
        s.write_all(&[0x03, 0, 0, 0, 0]).unwrap();
        held.push(s);
    }
    for _ in 0..4 {
        let mut s = connect(addr);
        s.write_all(&HUGE_PREFIX.to_le_bytes()).unwrap();
        held.push(s);
    }
    // After a handshake, a prefix within the negotiated maximum (the session's 512 MiB) and 16 MiB of the body:
    // the accelerator holds what arrived, not what the prefix promised.
    for _ in 0..2 {
        let mut s = handshaken(addr);
        s.write_all(&(500u32 << 20).to_le_bytes()).unwrap();
        s.write_all(&[0x03]).unwrap();
        s.write_all(&vec![0u8; 16 << 20]).unwrap();
        held.push(s);
    }
    thread::sleep(Duration::from_secs(1));
    server.assert_alive("huge length prefixes");
    let (peak, virt) = (server.peak_rss_mb(), server.status_field("VmPeak:") / 1024);
    eprintln!(
        "fault: with 8 huge prefixes and 2 × 16 MiB of 500 MiB bodies pending: peak RSS {peak} MB, peak virtual \
         size {virt} MB"
    );
    // Nothing was reserved from a prefix alone (four of them would be 4 GiB of address space).
    assert!(virt < VIRTUAL_BOUND_MB, "peak virtual size {virt} MB");
    // Before the handshake: refused at once (or at the handshake timeout); after it: at the idle timeout.
    let closed = wait_closed(&mut held, Duration::from_secs(8));
    assert_eq!(
        closed,
        held.len(),
        "connections with a huge prefix left open"
    );
    drop(held);

    // A stray HTTP request.
    let mut http = connect(addr);
    http.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let closed = wait_closed(std::slice::from_mut(&mut http), Duration::from_secs(6));
    assert_eq!(closed, 1, "the HTTP request's connection left open");
    drop(http);
    server.assert_alive("an HTTP request");

    // Slow senders, one byte every 0.5 s: a Hello (the handshake timeout ends it) and, after a handshake, a
    // request (the idle timeout ends it).
    let conv = request_frame(&Request::ConvForward {
        layer: 0,
        x_u: tensor(&[1, 1, 8, 8]),
        train: false,
    });
    let hello_frame = request_frame(&hello());
    let (slow_hello, slow_request) = thread::scope(|scope| {
        let h = scope.spawn(|| slow_send(connect(addr), &hello_frame, Duration::from_secs(10)));
        let r = scope.spawn(|| slow_send(handshaken(addr), &conv, Duration::from_secs(10)));
        (h.join().unwrap(), r.join().unwrap())
    });
    eprintln!(
        "fault: slow Hello closed after {slow_hello:?} s, slow request after {slow_request:?} s"
    );
    assert!(slow_hello.is_some(), "a slow Hello was never timed out");
    assert!(slow_request.is_some(), "a slow request was never timed out");
    server.assert_alive("slow senders");

    // 50 idle connections: beyond --max-connections they are closed at once, the rest at the handshake timeout;
    // no thread pool is made for any of them.
    let mut idle: Vec<TcpStream> = (0..50)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    thread::sleep(Duration::from_millis(500));
    let threads = server.threads();
    eprintln!(
        "fault: {} idle connections: {threads} accelerator threads",
        idle.len()
    );
    server.assert_alive("50 idle connections");
    assert!(
        threads < THREAD_BOUND,
        "{threads} threads for idle connections"
    );
    let closed = wait_closed(&mut idle, Duration::from_secs(8));
    assert_eq!(closed, idle.len(), "idle connections left open");
    drop(idle);

    // Abrupt closes mid-frame: in a Hello, in a request, and before reading a reply.
    let conv_frame = request_frame(&Request::ConvForward {
        layer: 0,
        x_u: tensor(&[1, 1, 64, 64]),
        train: true,
    });
    for i in 0..6 {
        let mut s = connect(addr);
        s.write_all(&hello_frame[..5]).unwrap();
        drop(s);
        let mut s = handshaken(addr);
        s.write_all(&conv_frame[..conv_frame.len() / 2 + i])
            .unwrap();
        drop(s);
        let mut s = handshaken(addr);
        s.write_all(&request_frame(&Request::Register {
            layers: vec![layer(4, 1, 3, 1, 1)],
            weights: vec![(tensor(&[4, 1, 3, 3]), None)],
        }))
        .unwrap();
        s.write_all(&conv_frame).unwrap();
        drop(s);
    }
    thread::sleep(Duration::from_millis(300));
    server.assert_alive("abrupt closes");

    let peak = server.peak_rss_mb();
    eprintln!(
        "fault: accelerator peak RSS under attack: {peak} MB (VmHWM; bound {PEAK_RSS_BOUND_MB} MB)"
    );
    assert!(
        peak < PEAK_RSS_BOUND_MB,
        "peak RSS {peak} MB under attack; log:\n{}",
        server.log()
    );

    // A legitimate training run against the same accelerator.
    let dir = tempfile::tempdir().unwrap();
    let accel = format!("tcp://{addr}");
    let o = train(
        &dir.path().join("run"),
        &[
            "--accelerator",
            &accel,
            "--insecure-plaintext-tcp",
            "--json",
        ],
    )
    .out;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "a legitimate run failed after the attacks: {err}\naccelerator log:\n{}",
        server.log()
    );
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON line");
    assert_eq!(m["epoch"], 1, "{m}");
    server.assert_alive("a legitimate run");
    eprintln!(
        "fault: legitimate run ok (test_acc {}); accelerator peak RSS now {} MB; {} log lines",
        m["test_acc"],
        server.peak_rss_mb(),
        server.log.lock().unwrap().len()
    );
}

/// With fewer file descriptors than connections, `accept()` fails (EMFILE): the accelerator logs it, retries,
/// and serves again once the connections are gone.
#[test]
fn failed_accepts_are_logged_and_retried() {
    let mut server = Server::start_with(Some(10));
    let addr = server.addr;
    let held: Vec<TcpStream> = (0..30)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    thread::sleep(Duration::from_secs(1));
    server.assert_alive("accept() failing for want of file descriptors");
    let log = server.log();
    let failures: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("accept") || l.contains("open files"))
        .collect();
    eprintln!(
        "fault: {} connections held with 10 file descriptors: {} log lines about accept(), e.g. {:?}",
        held.len(),
        failures.len(),
        failures.first()
    );
    assert!(!failures.is_empty(), "no failed accept() logged:\n{log}");
    drop(held);
    // Serving again: a registration and a conv.
    let mut s = handshaken(addr);
    let reg = call(
        &mut s,
        &Request::Register {
            layers: vec![layer(4, 1, 3, 1, 1)],
            weights: vec![(tensor(&[4, 1, 3, 3]), None)],
        },
    );
    assert_eq!(reg, Reply::Ok);
    let y = call(
        &mut s,
        &Request::ConvForward {
            layer: 0,
            x_u: tensor(&[2, 1, 8, 8]),
            train: false,
        },
    );
    match y {
        Reply::ConvOutput { y_u, .. } => assert_eq!(y_u.shape(), [2, 4, 8, 8]),
        other => panic!("{other:?}"),
    }
    server.assert_alive("serving again");
}

// ---------------------------------------------------------------------------------------------------------------
// The hostile accelerator.

/// What the hostile accelerator does once it has answered `Register`.
#[derive(Clone, Copy, Debug)]
enum Misbehaviour {
    /// Takes every request, answers none.
    Stall,
    /// Answers with a length prefix just under 1 GiB and nothing after it.
    HugePrefix,
    /// Sends part of a reply and closes the connection.
    CloseEarly,
}

/// A listener in this process that does the handshake properly, answers `Register` with `Ok`, then misbehaves.
/// Dropping it stops its threads.
struct HostileAccelerator {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Drop for HostileAccelerator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl HostileAccelerator {
    fn start(how: Misbehaviour) -> HostileAccelerator {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        thread::spawn(move || misbehave(s, how));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        HostileAccelerator { addr, stop }
    }

    fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }
}

/// One connection of the hostile accelerator (blocking reads: it ends when the client leaves).
fn misbehave(mut s: TcpStream, how: Misbehaviour) {
    s.set_nonblocking(false).unwrap();
    let next = |s: &mut TcpStream| -> Option<Request> {
        let frame = read_frame(s, 256 << 20).ok()?;
        decode_request(&frame, MAX_MESSAGE).ok()
    };
    let Some(Request::Hello { max_message, .. }) = next(&mut s) else {
        return;
    };
    let ack = Reply::HelloAck {
        version: PROTOCOL_VERSION,
        max_message: max_message.min(MAX_MESSAGE),
    };
    if s.write_all(&reply_frame(&ack)).is_err() {
        return;
    }
    if !matches!(next(&mut s), Some(Request::Register { .. })) {
        return;
    }
    if s.write_all(&reply_frame(&Reply::Ok)).is_err() {
        return;
    }
    // The first request after the registration (a ConvForward) is where it goes wrong.
    if next(&mut s).is_none() {
        return;
    }
    match how {
        Misbehaviour::Stall => {}
        Misbehaviour::HugePrefix => {
            let _ = s.write_all(&HUGE_PREFIX.to_le_bytes());
        }
        Misbehaviour::CloseEarly => {
            let _ = s.write_all(&[64, 0, 0, 0, 0x83, 1, 0]);
            return;
        }
    }
    // Takes whatever else comes, answers nothing, until the client leaves.
    while next(&mut s).is_some() {}
}

/// Asserts a clean failure of a command against a hostile accelerator: exit code 2 within 30 s, no panic, one
/// error line that says each thing once and contains one of `needles`. Returns the error line.
fn fails_cleanly(run: &Run, needles: &[&str]) -> String {
    let (o, took) = (&run.out, run.took);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(took < Duration::from_secs(30), "took {took:?}: {err}");
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    let line = lines[0];
    assert!(
        needles.iter().any(|n| line.contains(n)),
        "the error names none of {needles:?}: {line}"
    );
    let parts: Vec<&str> = line.split(": ").filter(|p| p.len() >= 8).collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(!parts[i + 1..].contains(p), "'{p}' said twice in: {line}");
    }
    line.to_string()
}

/// `asymml train --accelerator-timeout 2` against a hostile accelerator: a clean failure naming one of
/// `needles`. Returns the trusted side's peak resident memory, in MB.
fn train_against(how: Misbehaviour, needles: &[&str]) -> u64 {
    let hostile = HostileAccelerator::start(how);
    let dir = tempfile::tempdir().unwrap();
    let run = train(
        &dir.path().join("run"),
        &[
            "--accelerator",
            &hostile.url(),
            "--insecure-plaintext-tcp",
            "--accelerator-timeout",
            "2",
        ],
    );
    let line = fails_cleanly(&run, needles);
    eprintln!(
        "fault: train against an accelerator that {how:?}: exit 2 after {:.1} s, peak RSS {} MB: {line}",
        run.took.as_secs_f64(),
        run.peak_rss_mb
    );
    run.peak_rss_mb
}

#[test]
fn a_stalling_accelerator_times_out() {
    train_against(Misbehaviour::Stall, &["timed out"]);
}

#[test]
fn a_huge_reply_prefix_is_refused_or_times_out() {
    let peak = train_against(
        Misbehaviour::HugePrefix,
        &[
            "timed out",
            "exceeds",
            "too large",
            "larger than",
            "expected",
        ],
    );
    // The prefix is not believed: nothing near 1 GiB is allocated.
    assert!(
        peak < PEAK_RSS_BOUND_MB,
        "the trusted side peaked at {peak} MB"
    );
}

#[test]
fn an_accelerator_closing_mid_reply_is_a_clear_error() {
    train_against(Misbehaviour::CloseEarly, &["closed"]);
}

#[test]
fn a_stall_while_resuming_leaves_the_checkpoint_intact() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let first = train(&run, &["--json"]);
    assert!(
        first.out.status.success(),
        "{}",
        String::from_utf8_lossy(&first.out.stderr)
    );
    let checkpoint = run.join("checkpoint.safetensors");
    let before = std::fs::read(&checkpoint).expect("a checkpoint after one epoch");

    let hostile = HostileAccelerator::start(Misbehaviour::Stall);
    let resumed = asymml(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--epochs",
        "2",
        "--accelerator",
        &hostile.url(),
        "--insecure-plaintext-tcp",
        "--accelerator-timeout",
        "2",
    ]);
    let line = fails_cleanly(&resumed, &["timed out"]);
    eprintln!("fault: resume against a stalling accelerator: {line}");
    let after = std::fs::read(&checkpoint).expect("the checkpoint is still there");
    assert!(before == after, "the checkpoint changed");
    let epochs = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(epochs.lines().count(), 1, "{epochs}");
}
