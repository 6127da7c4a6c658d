//! Starting or reaching the untrusted accelerator: in this process (a thread; the default), a child process
//! over a Unix socket (`process`), or a server at `tcp://HOST:PORT` / `unix:PATH` (`asymml accelerator`).
//! A locally started accelerator computes on `--accelerator-device` (cpu, or cuda:N with the `cuda` feature).
//! `tcp://` is mutual TLS 1.3 with pinned certificates (`--keys DIR`, from `asymml keygen`), or, only with the
//! loudly named `--insecure-plaintext-tcp`, plaintext; Unix sockets and in-process channels stay plain (the
//! operating system protects them).

use crate::cli::AcceleratorArgs;
use crate::values::AcceleratorSpec;
use anyhow::{bail, Context, Result};
use asymml_protocol::{
    connect, connect_with, Accepted, Address, Listener, PinnedTls, Role, ServeOptions, TcpSecurity,
    Transport, TransportOptions, MAX_MESSAGE,
};
use asymml_untrusted::{Device, DeviceStats, Limits, Service};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running accelerator; dropping it stops a child process.
pub(crate) struct AcceleratorHandle {
    child: Option<Child>,
    socket: Option<std::path::PathBuf>,
    times: Option<Arc<Mutex<ServiceTimes>>>,
}

/// The in-process accelerator's compute time: every request's handling, in all and per conv layer.
#[derive(Clone, Debug, Default)]
pub(crate) struct ServiceTimes {
    pub(crate) total_s: f64,
    pub(crate) per_layer_s: Vec<f64>,
    /// A GPU backend's copy and kernel counters, as of the last request (`None` on the CPU).
    pub(crate) device: Option<asymml_untrusted::DeviceStats>,
}

impl ServiceTimes {
    /// Seconds spent on requests about conv `layer`.
    pub(crate) fn layer_s(&self, layer: usize) -> f64 {
        self.per_layer_s.get(layer).copied().unwrap_or(0.0)
    }

    fn add(&mut self, layer: Option<u32>, s: f64) {
        self.total_s += s;
        if let Some(l) = layer.map(|l| l as usize) {
            if self.per_layer_s.len() <= l {
                self.per_layer_s.resize(l + 1, 0.0);
            }
            self.per_layer_s[l] += s;
        }
    }
}

impl AcceleratorHandle {
    /// The compute-time counters of an in-process accelerator (`None` for a child process or a server).
    pub(crate) fn times(&self) -> Option<Arc<Mutex<ServiceTimes>>> {
        self.times.clone()
    }
}

impl Drop for AcceleratorHandle {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(s) = &self.socket {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// One line about a device backend's copies and kernels.
pub(crate) fn stats_line(s: &DeviceStats) -> String {
    format!(
        "copies {:.3} s ({:.1} MB up, {:.1} MB down), kernels {:.3} s",
        s.copy_s,
        s.bytes_up as f64 / 1e6,
        s.bytes_down as f64 / 1e6,
        s.kernel_s
    )
}

/// A transport to the accelerator, and the handle that keeps a locally started one alive.
pub(crate) type Started = (Box<dyn Transport + Send>, AcceleratorHandle);

/// How a `tcp://` connection is secured, from the flags: `--keys DIR` or `--insecure-plaintext-tcp`.
#[derive(Clone, Debug, Default)]
pub(crate) struct TcpKeys {
    /// The key folder of `asymml keygen` (mutual TLS 1.3 with pinned certificates).
    pub(crate) keys: Option<PathBuf>,
    /// Plaintext, for loopback experiments (warned about on stderr).
    pub(crate) insecure_plaintext: bool,
}

impl TcpKeys {
    /// The security of a connection to or from `addr` for `role`: TLS with the keys of the folder, plaintext
    /// with a warning, or an error saying how to make keys. Unix sockets are plain (the flags do not apply).
    pub(crate) fn security(&self, addr: &Address, role: Role) -> Result<TcpSecurity> {
        if !matches!(addr, Address::Tcp(_)) {
            return Ok(TcpSecurity::InsecurePlaintext);
        }
        match (&self.keys, self.insecure_plaintext) {
            (Some(_), true) => {
                bail!("--keys and --insecure-plaintext-tcp exclude each other: give one")
            }
            (Some(dir), false) => Ok(TcpSecurity::Tls(load_keys(dir, role)?)),
            (None, true) => {
                let who = match role {
                    Role::Trusted => {
                        "the data sent to the accelerator can be read, and its results altered"
                    }
                    Role::Accelerator => {
                        "anyone who reaches the port can use this accelerator, and the traffic can be read \
                         and altered"
                    }
                };
                eprintln!(
                    "WARNING: --insecure-plaintext-tcp: {addr} is neither encrypted nor authenticated; {who} by \
                     anyone on the path. Use it on loopback only; otherwise make keys with `asymml keygen \
                     --out DIR` and pass --keys DIR on both sides."
                );
                Ok(TcpSecurity::InsecurePlaintext)
            }
            (None, false) => bail!(
                "{addr} needs keys: run `asymml keygen --out DIR` once, give the {} side DIR's {}, {} and {} \
                 and pass --keys DIR (tcp:// is mutual TLS with pinned certificates; \
                 --insecure-plaintext-tcp turns that off for loopback experiments)",
                role,
                role.key_file(),
                role.cert_file(),
                role.peer().cert_file()
            ),
        }
    }
}

/// The TLS settings of `role` from the key folder `dir`.
fn load_keys(dir: &Path, role: Role) -> Result<PinnedTls> {
    PinnedTls::load(dir, role).with_context(|| {
        format!(
            "loading the {role} side's TLS keys from {} (it needs {}, {} and {}; `asymml keygen --out DIR`              makes them)",
            dir.display(),
            role.key_file(),
            role.cert_file(),
            role.peer().cert_file()
        )
    })
}

/// Starts or connects to the accelerator `spec`; `threads` sizes a locally started accelerator's pool (0: all
/// cores) and `device` is where a locally started accelerator computes (a remote one chooses its own device).
/// `timeout` is the longest wait for any reply (and, over a socket, for the peer to take a request): past it
/// the transport fails with a [`ProtocolError::Timeout`](asymml_protocol::ProtocolError::Timeout). A
/// `tcp://` accelerator is reached as `tcp` says (TLS with pinned keys, or plaintext when asked for).
pub(crate) fn start(
    spec: &AcceleratorSpec,
    threads: usize,
    device: Device,
    timeout: Duration,
    tcp: &TcpKeys,
) -> Result<Started> {
    match spec {
        AcceleratorSpec::InProc => start_inproc(threads, device, timeout),
        AcceleratorSpec::Process => start_process(threads, device, timeout),
        AcceleratorSpec::Remote(addr) => connect_remote(addr, device, timeout, tcp),
    }
}

/// The options of a socket to the accelerator: `timeout` on every read and write; connecting (and then the
/// TLS handshake) waits at most 30 s (or `timeout`, when shorter).
fn client_options(timeout: Duration) -> TransportOptions {
    let mut opts = TransportOptions::with_timeout(timeout);
    opts.connect_timeout = Some(timeout.min(Duration::from_secs(30)));
    opts
}

/// The session budget of an accelerator this command starts for itself (in-process or a child process): it
/// serves only this process, so its budget guards against a runaway estimate, not against other clients —
/// this machine's memory (at least the server's default of 8 GiB). A VGG16 at 224 px and batch 32 needs about
/// 10 GB.
fn local_limits() -> Limits {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb.saturating_mul(1024));
    let default = Limits::default().max_session_bytes;
    Limits {
        max_session_bytes: total.max(default),
    }
}

/// The accelerator on a thread of this process, its compute time counted per request; the trusted end waits
/// at most `timeout` for each reply (the accelerator's end waits for requests without limit).
fn start_inproc(threads: usize, device: Device, timeout: Duration) -> Result<Started> {
    let (mut client, server) = asymml_protocol::inproc_pair();
    client.set_read_timeout(Some(timeout));
    // The service is created on its own thread (a CUDA backend stays on the thread that made it); the thread
    // reports whether it could open its device.
    let (tx, rx) = std::sync::mpsc::sync_channel::<std::result::Result<(), String>>(1);
    let times = Arc::new(Mutex::new(ServiceTimes::default()));
    let counters = times.clone();
    asymml_untrusted::on_thread_start(crate::alloc::enter_accelerator);
    std::thread::Builder::new()
        .name("accelerator".into())
        .spawn(move || {
            crate::alloc::enter_accelerator();
            asymml_protocol::codec::set_copy_threads(asymml_untrusted::pool_threads(threads));
            match Service::with_device_limits(device, threads, local_limits()) {
                Ok(service) => {
                    let _ = tx.send(Ok(()));
                    serve_inproc(service, server, &counters);
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                }
            }
        })
        .context("starting the accelerator thread")?;
    match rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("starting the in-process accelerator: {e}"),
        Err(_) => bail!("starting the in-process accelerator: its thread ended"),
    }
    let handle = AcceleratorHandle {
        child: None,
        socket: None,
        times: Some(times),
    };
    Ok((Box::new(client), handle))
}

/// The in-process accelerator's loop: handles requests until the client hangs up, timing each.
fn serve_inproc(mut service: Service, server: impl Transport, counters: &Mutex<ServiceTimes>) {
    let served = asymml_protocol::serve(server, &mut |req| {
        let layer = req.layer();
        let t0 = Instant::now();
        let reply = service.handle(req);
        if let Ok(mut t) = counters.lock() {
            t.add(layer, t0.elapsed().as_secs_f64());
            t.device = service.stats();
        }
        reply
    });
    if let Err(e) = served {
        eprintln!("accelerator: {}", asymml_core::error_chain(&e));
    }
    if let Some(st) = service.stats() {
        if std::env::var_os("ASYMML_ACCEL_STATS").is_some() {
            eprintln!("accelerator ({}): {}", service.describe(), stats_line(&st));
        }
    }
}

/// The accelerator in a child process (`asymml accelerator --once`) listening on a fresh Unix socket.
fn start_process(threads: usize, device: Device, timeout: Duration) -> Result<Started> {
    let exe = std::env::current_exe().context("locating the asymml executable")?;
    let sock = std::env::temp_dir().join(format!(
        "asymml-accel-{}-{}.sock",
        std::process::id(),
        unique()
    ));
    device.check_compiled_in()?;
    let child = Command::new(exe)
        .args(["accelerator", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .args(["--accelerator-threads", &threads.to_string(), "--once"])
        // The child serves only this process, which kills it when done: no idle limit of its own that a
        // long pause of the trusted side (evaluation, checkpoints) could run into.
        .args(["--idle-timeout", "86400"])
        .args(["--accelerator-device", &device.to_string()])
        .args([
            "--max-session-bytes",
            &local_limits().max_session_bytes.to_string(),
        ])
        .stdin(Stdio::null())
        .spawn()
        .context("starting the accelerator process")?;
    let mut handle = AcceleratorHandle {
        child: Some(child),
        socket: Some(sock.clone()),
        times: None,
    };
    let addr = Address::Unix(sock);
    let opts = client_options(timeout);
    let t0 = Instant::now();
    loop {
        match connect(&addr, &opts) {
            Ok(t) => return Ok((t, handle)),
            Err(e) if t0.elapsed() > Duration::from_secs(20) => {
                bail!("the accelerator process did not start listening: {e}")
            }
            Err(_) => {
                if let Some(status) = handle
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    bail!("the accelerator process exited at start ({status})");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A server started with `asymml accelerator --listen`, which picks its own device.
fn connect_remote(
    addr: &Address,
    device: Device,
    timeout: Duration,
    tcp: &TcpKeys,
) -> Result<Started> {
    if device != Device::Cpu {
        bail!(
            "--accelerator-device {device} applies to an accelerator this command starts (--accelerator \
             inproc or process); a remote accelerator chooses its own with `asymml accelerator \
             --accelerator-device`"
        );
    }
    let security = tcp.security(addr, Role::Trusted)?;
    let t = connect_with(addr, &client_options(timeout), &security)
        .with_context(|| format!("connecting to the accelerator at {addr}"))?;
    let handle = AcceleratorHandle {
        child: None,
        socket: None,
        times: None,
    };
    Ok((t, handle))
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Runs `asymml accelerator`: serves connections on `--listen`, each with its own model state on its own
/// thread (with `--once`, only the first connection, then exits); the convolutions run on
/// `--accelerator-device`. At most `--max-connections` are served at once (one more is closed as it comes);
/// each must complete its handshake within `--handshake-timeout` (over `tcp://`, first the TLS handshake,
/// with the client's pinned certificate, within it, on the connection's own thread; then the Hello within
/// it), send each request within `--idle-timeout`, and stay within `--max-session-bytes`. With `--once`, a
/// connection refused in the TLS handshake does not count: the next one is waited for. A failed `accept()`
/// (e.g. out of file descriptors) is logged and retried after a pause that doubles from 10 ms to 1 s.
pub fn run(a: AcceleratorArgs) -> Result<()> {
    let (device, threads) = (a.accelerator_device, a.accelerator_threads);
    // A device the accelerator cannot use fails here, before it listens. (Each connection opens its own.)
    let described = if device == Device::Cpu {
        None
    } else {
        let probe = Service::with_device(device, threads)?;
        Some(probe.describe())
    };
    let tcp = TcpKeys {
        keys: a.keys.clone(),
        insecure_plaintext: a.insecure_plaintext_tcp,
    };
    let security = tcp.security(&a.listen, Role::Accelerator)?;
    let secured = match &security {
        TcpSecurity::Tls(tls) => {
            format!("mutual TLS 1.3, client pinned to {}, ", tls.pinned_from())
        }
        TcpSecurity::InsecurePlaintext if matches!(a.listen, Address::Tcp(_)) => {
            "PLAINTEXT, ".to_string()
        }
        TcpSecurity::InsecurePlaintext => String::new(),
    };
    let opts = TransportOptions {
        // A client that does not take its replies is dropped after the idle timeout too.
        write_timeout: Some(a.idle_timeout),
        // The TLS handshake of a connection.
        connect_timeout: Some(a.handshake_timeout),
        ..TransportOptions::default()
    };
    let listener = Listener::bind_with(&a.listen, opts, security)
        .with_context(|| format!("listening on {}", a.listen))?;
    eprintln!(
        "asymml accelerator: listening on {} ({secured}{}, {} thread(s) per connection, at most {} \
         connection(s), {} bytes per session)",
        listener
            .local_address()
            .map(|addr| addr.to_string())
            .unwrap_or_else(|_| a.listen.to_string()),
        described.unwrap_or_else(|| device.to_string()),
        asymml_untrusted::pool_threads(threads),
        a.max_connections,
        a.max_session_bytes
    );
    let session = Session {
        device,
        threads,
        limits: Limits {
            max_session_bytes: a.max_session_bytes,
        },
        serve: ServeOptions {
            // No frame can be larger than the session's whole budget.
            max_message: u32::try_from(a.max_session_bytes)
                .unwrap_or(u32::MAX)
                .min(MAX_MESSAGE),
            handshake_timeout: Some(a.handshake_timeout),
            idle_timeout: Some(a.idle_timeout),
            ..ServeOptions::default()
        },
    };
    let open = Arc::new(AtomicUsize::new(0));
    let mut pause = ACCEPT_PAUSE_MIN;
    loop {
        let accepted = match listener.accept_pending() {
            Ok(t) => {
                pause = ACCEPT_PAUSE_MIN;
                t
            }
            Err(e) => {
                eprintln!(
                    "asymml accelerator: accepting a connection: {}; retrying in {pause:?}",
                    asymml_core::error_chain(&e)
                );
                std::thread::sleep(pause);
                pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
                continue;
            }
        };
        let Some(slot) = ConnectionSlot::take(&open, a.max_connections as usize) else {
            eprintln!(
                "asymml accelerator: {} refused: {} connection(s) open, the most --max-connections allows",
                accepted.peer(),
                a.max_connections
            );
            continue;
        };
        if a.once {
            if serve_connection(accepted, &session) {
                return Ok(());
            }
            continue;
        }
        let session = session.clone();
        let spawned = std::thread::Builder::new()
            .name("accelerator-connection".into())
            .spawn(move || {
                let _slot = slot;
                serve_connection(accepted, &session);
            });
        if let Err(e) = spawned {
            // The closure (with the connection and its slot) was dropped: the connection is closed.
            eprintln!("asymml accelerator: starting a connection thread: {e}; connection closed");
        }
    }
}

/// The first pause after a failed `accept()`; it doubles up to [`ACCEPT_PAUSE_MAX`].
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
/// The longest pause between failed `accept()`s.
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// What every connection of `asymml accelerator` is served with.
#[derive(Clone)]
struct Session {
    device: Device,
    threads: usize,
    limits: Limits,
    serve: ServeOptions,
}

/// One of the `--max-connections` places, given back when dropped.
struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    /// A place if fewer than `max` are taken.
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| ConnectionSlot(open.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One connection of `asymml accelerator`: its TLS handshake (where the listener asks for TLS), then its own
/// service (its backend and threads are started at the first registration); its end is reported on stderr.
/// False when the connection was refused before any message (its TLS handshake failed).
fn serve_connection(accepted: Accepted, session: &Session) -> bool {
    let peer = accepted.peer().to_string();
    // Its frames' large tensors are read and written on up to the connection's threads.
    asymml_protocol::codec::set_copy_threads(asymml_untrusted::pool_threads(session.threads));
    let transport = match accepted.establish() {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "asymml accelerator: {peer} refused: {}",
                asymml_core::error_chain(&e)
            );
            return false;
        }
    };
    let result = Service::with_limits(session.device, session.threads, session.limits)
        .map_err(anyhow::Error::from)
        .and_then(|mut s| {
            s.serve_opts(transport, &session.serve)
                .map_err(anyhow::Error::from)?;
            Ok(s.stats())
        });
    match result {
        Ok(Some(st)) => eprintln!("asymml accelerator: {peer} done; {}", stats_line(&st)),
        Ok(None) => eprintln!("asymml accelerator: {peer} done"),
        Err(e) => eprintln!("asymml accelerator: {peer}: {e:#}"),
    }
    true
}
