//! Mutual TLS 1.3 over TCP with pinned certificates: the transport between a trusted runtime and an
//! accelerator on another machine.
//!
//! Each side holds its own key pair (a self-signed certificate, e.g. from `asymml keygen`) and the other
//! side's certificate, and accepts exactly that certificate: there is no certificate authority and no host
//! name check. The accelerator (the TLS server) asks for the client's certificate and refuses any other
//! than the pinned one during the handshake, before a single frame is read; the trusted runtime (the TLS
//! client) likewise refuses an accelerator without the pinned certificate before sending anything. Only TLS
//! 1.3 is spoken (rustls with the *ring* provider); no session tickets, no resumption.
//!
//! Files of a key folder ([`Role`]): the trusted side needs `trusted.key`, `trusted.crt` and
//! `accelerator.crt`; the accelerator needs `accelerator.key`, `accelerator.crt` and `trusted.crt`.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::NoServerSessionStorage;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, ConnectionCommon,
    DigitallySignedStruct, DistinguishedName, ServerConfig, ServerConnection, SignatureScheme,
    StreamOwned,
};

use crate::error::{ProtocolError, Result};
use crate::queued::{Duplex, QueuedTransport};
use crate::transport::{
    io_error, read_frame, setup_error, tcp_connect, tcp_peer, tcp_prepare, write_frame, TimedRead,
    Transport, TransportOptions, Waits,
};

/// The name the trusted runtime asks for in its ClientHello (not checked: the certificate is pinned).
const SERVER_NAME: &str = "asymml-accelerator";

/// The two sides of the boundary, and the files of a key folder that belong to each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The trusted runtime (the TLS client).
    Trusted,
    /// The accelerator (the TLS server).
    Accelerator,
}

impl Role {
    /// The file of this side's private key (PEM, PKCS#8).
    pub fn key_file(self) -> &'static str {
        match self {
            Role::Trusted => "trusted.key",
            Role::Accelerator => "accelerator.key",
        }
    }

    /// The file of this side's certificate (PEM).
    pub fn cert_file(self) -> &'static str {
        match self {
            Role::Trusted => "trusted.crt",
            Role::Accelerator => "accelerator.crt",
        }
    }

    /// The other side.
    pub fn peer(self) -> Role {
        match self {
            Role::Trusted => Role::Accelerator,
            Role::Accelerator => Role::Trusted,
        }
    }

    /// The name written into this side's certificate (`asymml-trusted`, `asymml-accelerator`).
    pub fn subject_name(self) -> &'static str {
        match self {
            Role::Trusted => "asymml-trusted",
            Role::Accelerator => SERVER_NAME,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Trusted => "trusted",
            Role::Accelerator => "accelerator",
        })
    }
}

/// One side's TLS settings: its own certificate and key, and the peer's pinned certificate. Holds a client
/// configuration (for the trusted runtime) and a server configuration (for the accelerator), both TLS 1.3
/// only with mandatory, pinned certificates on both ends.
#[derive(Clone)]
pub struct PinnedTls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    /// Where the pinned certificate came from, for messages (e.g. `keys/accelerator.crt`).
    pinned_from: String,
}

impl fmt::Debug for PinnedTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedTls")
            .field("pinned_from", &self.pinned_from)
            .finish_non_exhaustive()
    }
}

impl PinnedTls {
    /// From DER: this side's certificate and private key, and the one certificate the peer must present.
    /// Fails if the key does not belong to the certificate (or cannot be used).
    pub fn new(
        own_cert: CertificateDer<'static>,
        own_key: PrivateKeyDer<'static>,
        peer_cert: CertificateDer<'static>,
    ) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pinned = Arc::new(Pinned {
            cert: peer_cert,
            algorithms: provider.signature_verification_algorithms,
        });
        let bad = |e: rustls::Error| ProtocolError::InvalidValue {
            what: "TLS certificate and key",
            detail: e.to_string(),
        };
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(bad)?
            .dangerous()
            .with_custom_certificate_verifier(pinned.clone())
            .with_client_auth_cert(vec![own_cert.clone()], own_key.clone_key())
            .map_err(bad)?;
        client.resumption = Resumption::disabled();
        client.enable_sni = false;
        let mut server = server_builder(provider)?
            .with_client_cert_verifier(pinned)
            .with_single_cert(vec![own_cert], own_key)
            .map_err(bad)?;
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(NoServerSessionStorage {});
        Ok(PinnedTls {
            client: Arc::new(client),
            server: Arc::new(server),
            pinned_from: "the pinned certificate".into(),
        })
    }

    /// From PEM text: this side's certificate and private key, and the peer's certificate.
    pub fn from_pem(own_cert: &[u8], own_key: &[u8], peer_cert: &[u8]) -> Result<Self> {
        let cert = |pem: &[u8], what: &str| {
            CertificateDer::from_pem_slice(pem).map_err(|e| pem_error(what, e))
        };
        let key = PrivateKeyDer::from_pem_slice(own_key).map_err(|e| pem_error("own key", e))?;
        Self::new(
            cert(own_cert, "own certificate")?,
            key,
            cert(peer_cert, "peer certificate")?,
        )
    }

    /// From a key folder: `role`'s key and certificate, and the certificate of its peer (see [`Role`]).
    pub fn load(dir: &Path, role: Role) -> Result<Self> {
        let read = |name: &str| -> Result<(Vec<u8>, PathBuf)> {
            let path = dir.join(name);
            let bytes = std::fs::read(&path)
                .map_err(|e| setup_error(e, &format!("reading {}", path.display())))?;
            Ok((bytes, path))
        };
        let (own_cert, own_cert_path) = read(role.cert_file())?;
        let (own_key, own_key_path) = read(role.key_file())?;
        let (peer_cert, peer_cert_path) = read(role.peer().cert_file())?;
        let cert = |pem: &[u8], path: &Path| {
            CertificateDer::from_pem_slice(pem)
                .map_err(|e| pem_error(&path.display().to_string(), e))
        };
        let key = PrivateKeyDer::from_pem_slice(&own_key)
            .map_err(|e| pem_error(&own_key_path.display().to_string(), e))?;
        let mut tls = Self::new(
            cert(&own_cert, &own_cert_path)?,
            key,
            cert(&peer_cert, &peer_cert_path)?,
        )?;
        tls.pinned_from = peer_cert_path.display().to_string();
        Ok(tls)
    }

    /// Where the pinned certificate came from (a file, or "the pinned certificate").
    pub fn pinned_from(&self) -> &str {
        &self.pinned_from
    }
}

fn server_builder(
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>> {
    ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ProtocolError::InvalidValue {
            what: "TLS configuration",
            detail: e.to_string(),
        })
}

fn pem_error(what: &str, e: rustls::pki_types::pem::Error) -> ProtocolError {
    ProtocolError::InvalidValue {
        what: "TLS key file",
        detail: format!("{what}: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The pinning verifiers

/// Accepts exactly one end-entity certificate (byte for byte), and handshake signatures made with its key.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl Pinned {
    fn check(&self, end_entity: &CertificateDer<'_>) -> std::result::Result<(), rustls::Error> {
        // Intermediates are ignored: the end-entity certificate alone is pinned.
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        // The certificate was checked against the pin before; the signature proves the peer holds its key.
        self.check(cert)?;
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

fn no_tls12() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is not accepted".into())
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The transport

/// The TLS session and its socket, on either end.
enum TlsStream {
    Client(StreamOwned<ClientConnection, TcpStream>),
    Server(StreamOwned<ServerConnection, TcpStream>),
}

impl TlsStream {
    fn sock(&self) -> &TcpStream {
        match self {
            TlsStream::Client(s) => &s.sock,
            TlsStream::Server(s) => &s.sock,
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            TlsStream::Client(s) => s.read(buf),
            TlsStream::Server(s) => s.read(buf),
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            TlsStream::Client(s) => s.write(buf),
            TlsStream::Server(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            TlsStream::Client(s) => s.flush(),
            TlsStream::Server(s) => s.flush(),
        }
    }
}

impl TimedRead for TlsStream {
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.sock().set_read_timeout(timeout)
    }
}

/// A TCP connection secured by mutual TLS 1.3 with pinned certificates (TCP_NODELAY set). Frames, read and
/// write timeouts and the frame deadline behave as over [`TcpTransport`](crate::TcpTransport).
pub struct TlsTransport {
    stream: TlsStream,
    max_message: u32,
    waits: Waits,
    peer: String,
    /// Whether a frame has arrived: a failure before the first one is explained as a likely refusal of this
    /// side's certificate (in TLS 1.3 the server checks the client's certificate after the client is done).
    heard: bool,
}

impl TlsTransport {
    /// Connects to `HOST:PORT` (without the `tcp://` scheme) as the TLS client (the trusted runtime): the TCP
    /// connection and then the TLS handshake must each complete within `opts.connect_timeout`, and the
    /// server must present the certificate `tls` pins.
    pub fn connect(host_port: &str, opts: &TransportOptions, tls: &PinnedTls) -> Result<Self> {
        let (conn, sock, peer) = client_session(host_port, opts, tls)?;
        Ok(Self::wrap(
            TlsStream::Client(StreamOwned::new(conn, sock)),
            opts,
            peer,
        ))
    }

    /// [`TlsTransport::connect`], the session then shared by a writer and a reader thread of its own (see
    /// [`QueuedTransport`]): requests and replies queue both ways, so the trusted runtime may keep several
    /// requests outstanding. The session's lock is held for its in-memory work only (encrypting a record,
    /// decrypting what arrived), never while the socket is read or written.
    pub fn connect_queued(
        host_port: &str,
        opts: &TransportOptions,
        tls: &PinnedTls,
    ) -> Result<QueuedTransport> {
        let (conn, sock, peer) = client_session(host_port, opts, tls)?;
        let out = sock
            .try_clone()
            .map_err(|e| setup_error(e, "cloning the TLS socket"))?;
        let half = TlsHalf {
            shared: Arc::new(TlsShared {
                conn: Mutex::new(conn),
                out: Mutex::new(out),
            }),
            sock,
            raw: Vec::new(),
            at: 0,
        };
        let waits = Waits {
            read_timeout: opts.read_timeout,
            frame_timeout: opts.frame_timeout,
        };
        let named = peer.clone();
        Ok(QueuedTransport::start(half, peer, opts.max_message, waits)?
            .with_explain(Box::new(move |e, heard| explain(e, heard, &named))))
    }

    /// Completes an accepted connection as the TLS server (the accelerator): the handshake must complete
    /// within `opts.connect_timeout`, and the client must present the certificate `tls` pins; nothing of the
    /// client's is read as a frame before that.
    pub fn accept(mut sock: TcpStream, opts: &TransportOptions, tls: &PinnedTls) -> Result<Self> {
        let peer = tcp_peer(&sock);
        let mut conn =
            ServerConnection::new(tls.server.clone()).map_err(|e| tls_failure(&e, &peer, tls))?;
        handshake(&mut conn, &mut sock, opts.connect_timeout, &peer, tls)?;
        tcp_prepare(&sock, opts)?;
        Ok(Self::wrap(
            TlsStream::Server(StreamOwned::new(conn, sock)),
            opts,
            peer,
        ))
    }

    fn wrap(stream: TlsStream, opts: &TransportOptions, peer: String) -> Self {
        TlsTransport {
            stream,
            max_message: opts.max_message,
            waits: Waits {
                read_timeout: opts.read_timeout,
                frame_timeout: opts.frame_timeout,
            },
            peer,
            heard: false,
        }
    }

    /// The underlying TCP stream.
    pub fn stream(&self) -> &TcpStream {
        self.stream.sock()
    }

    /// `e` with what TLS said, and a hint where the peer likely refused this side's certificate.
    fn explain(&self, e: ProtocolError) -> ProtocolError {
        explain(e, self.heard, &self.peer)
    }
}

/// `e`, a failure of the TLS connection with `peer`, with what TLS said, and a hint where the peer likely
/// refused this side's certificate (`heard`: a frame had arrived before it).
fn explain(e: ProtocolError, heard: bool, peer: &str) -> ProtocolError {
    {
        if let ProtocolError::Io { source, .. } = &e {
            let inner = source
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>());
            if let Some(rustls::Error::AlertReceived(alert)) = inner {
                if refuses_certificate(*alert) {
                    return ProtocolError::Handshake(format!(
                        "TLS: {peer} refused this side's certificate ({alert:?}): it must pin this side's \
                         certificate (the key folders of both sides must come from the same `asymml \
                         keygen`)"
                    ));
                }
            }
        }
        match e {
            ProtocolError::Closed { detail, mid_frame } if !heard => ProtocolError::Closed {
                detail: format!(
                    "{detail}; right after the TLS handshake, so the peer may have refused this side's \
                     certificate (it must pin it)"
                ),
                mid_frame,
            },
            e => e,
        }
    }
}

impl Transport for TlsTransport {
    fn send(&mut self, frame: &[u8]) -> Result<()> {
        write_frame(&mut self.stream, frame, &self.peer).map_err(|e| self.explain(e))
    }

    fn recv_into(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        let r = read_frame(
            &mut self.stream,
            buf,
            self.max_message,
            &self.peer,
            self.waits,
        );
        match r {
            Ok(()) => {
                self.heard = true;
                Ok(())
            }
            Err(e) => Err(self.explain(e)),
        }
    }

    fn max_message(&self) -> u32 {
        self.max_message
    }

    fn set_max_message(&mut self, max: u32) {
        self.max_message = max;
    }

    fn peer(&self) -> String {
        self.peer.clone()
    }

    fn set_frame_timeout(&mut self, timeout: Option<Duration>) {
        self.waits.frame_timeout = timeout;
        // A frame read under a deadline leaves a shorter socket timeout behind; without one, the read timeout
        // applies again.
        let _ = self.stream.set_timeout(self.waits.read_timeout);
    }
}

impl Drop for TlsTransport {
    /// Says goodbye (close_notify), so that the peer sees a clean end rather than a truncation; bounded by
    /// the write timeout, errors ignored.
    fn drop(&mut self) {
        match &mut self.stream {
            TlsStream::Client(s) => goodbye(&mut s.conn, &mut s.sock),
            TlsStream::Server(s) => goodbye(&mut s.conn, &mut s.sock),
        }
    }
}

fn goodbye<D>(conn: &mut ConnectionCommon<D>, sock: &mut TcpStream) {
    conn.send_close_notify();
    while conn.wants_write() {
        if conn.write_tls(sock).is_err() {
            break;
        }
    }
}

/// The TCP connection to `HOST:PORT` and the TLS session over it, as the client (the trusted runtime): the
/// handshake done, the server's pinned certificate checked, the socket's timeouts set. Returns the peer's
/// name too.
fn client_session(
    host_port: &str,
    opts: &TransportOptions,
    tls: &PinnedTls,
) -> Result<(ClientConnection, TcpStream, String)> {
    let mut sock = tcp_connect(host_port, opts)?;
    let peer = tcp_peer(&sock);
    let name = ServerName::try_from(SERVER_NAME).map_err(|e| ProtocolError::InvalidValue {
        what: "TLS server name",
        detail: e.to_string(),
    })?;
    let mut conn =
        ClientConnection::new(tls.client.clone(), name).map_err(|e| tls_failure(&e, &peer, tls))?;
    handshake(&mut conn, &mut sock, opts.connect_timeout, &peer, tls)?;
    tcp_prepare(&sock, opts)?;
    Ok((conn, sock, peer))
}

/// A client TLS session shared by the two halves of a [`QueuedTransport`].
struct TlsShared {
    conn: Mutex<ClientConnection>,
    /// The socket's sending side: the records of one write go out whole, whichever half made them (the
    /// receiving half sends what the session answers to what it read, e.g. an alert).
    out: Mutex<TcpStream>,
}

/// One half of a shared client TLS session: the writer encrypts and sends, the reader receives and decrypts.
struct TlsHalf {
    shared: Arc<TlsShared>,
    /// This half's handle of the socket (the reader reads from it; either shuts it down).
    sock: TcpStream,
    /// Bytes read from the socket, from `at` on not yet given to the session.
    raw: Vec<u8>,
    at: usize,
}

/// Bytes read from the socket at a time by a [`TlsHalf`].
const TLS_READ: usize = 1 << 16;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The TLS records the session has ready to send.
fn records(c: &mut ClientConnection) -> Vec<u8> {
    let mut out = Vec::new();
    while c.wants_write() {
        // Into a Vec a write cannot fail.
        if c.write_tls(&mut out).is_err() {
            break;
        }
    }
    out
}

impl TlsHalf {
    fn send_records(&self, records: &[u8]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        lock(&self.shared.out).write_all(records)
    }
}

impl Read for TlsHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let (got, answer, stuck) = {
                let mut c = lock(&self.shared.conn);
                // Give the session what was read (as much as its buffers take), then take out plaintext.
                while self.at < self.raw.len() {
                    let n = c.read_tls(&mut &self.raw[self.at..]).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    self.at += n;
                    c.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                }
                let got = match c.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                    r => Some(r),
                };
                (got, records(&mut c), self.at < self.raw.len())
            };
            self.send_records(&answer)?;
            if let Some(r) = got {
                return r;
            }
            if stuck {
                return Err(io::Error::other(
                    "the TLS session takes no more bytes and gives no plaintext",
                ));
            }
            self.raw.resize(TLS_READ, 0);
            self.at = 0;
            let n = match self.sock.read(&mut self.raw) {
                Ok(n) => n,
                Err(e) => {
                    self.raw.clear();
                    return Err(e);
                }
            };
            self.raw.truncate(n);
            if n == 0 {
                // The peer closed: the session learns of it, and says whether cleanly (close_notify: 0 bytes)
                // or not (an error).
                let mut c = lock(&self.shared.conn);
                let _ = c.read_tls(&mut &[][..]);
                let _ = c.process_new_packets();
                return match c.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                    r => r,
                };
            }
        }
    }
}

impl Write for TlsHalf {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let (n, out) = {
            let mut c = lock(&self.shared.conn);
            let n = c.writer().write(data)?;
            (n, records(&mut c))
        };
        self.send_records(&out)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let out = {
            let mut c = lock(&self.shared.conn);
            c.writer().flush()?;
            records(&mut c)
        };
        self.send_records(&out)?;
        lock(&self.shared.out).flush()
    }
}

impl TimedRead for TlsHalf {
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(timeout)
    }
}

impl Duplex for TlsHalf {
    fn clone_stream(&self) -> io::Result<Self> {
        Ok(TlsHalf {
            shared: Arc::clone(&self.shared),
            sock: self.sock.try_clone()?,
            raw: Vec::new(),
            at: 0,
        })
    }

    fn shut(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    fn goodbye(&mut self) {
        let out = {
            let mut c = lock(&self.shared.conn);
            c.send_close_notify();
            records(&mut c)
        };
        let _ = self.send_records(&out);
    }
}

/// Alerts by which a peer refuses the certificate it was shown.
fn refuses_certificate(alert: AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::AccessDenied
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRequired
            | AlertDescription::DecryptError
    )
}

/// A TLS failure of the handshake with `peer`, in words.
fn tls_failure(e: &rustls::Error, peer: &str, tls: &PinnedTls) -> ProtocolError {
    let detail = match e {
        rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            format!(
                "{peer} presented a certificate other than the pinned one ({}); refused",
                tls.pinned_from
            )
        }
        rustls::Error::AlertReceived(alert) if refuses_certificate(*alert) => format!(
            "{peer} refused this side's certificate ({alert:?}): it must pin this side's certificate"
        ),
        rustls::Error::NoCertificatesPresented => {
            format!("{peer} presented no certificate; refused")
        }
        rustls::Error::InvalidMessage(_) => format!(
            "{peer} does not speak TLS ({e}); is it a plaintext peer (--insecure-plaintext-tcp on one side \
             only)?"
        ),
        e => format!("with {peer}: {e}"),
    };
    ProtocolError::Handshake(format!("TLS: {detail}"))
}

/// Runs the TLS handshake on `sock` within `timeout` (the socket's read and write timeouts are set to what
/// is left before each step). On a TLS failure the alert that says why is sent to the peer.
fn handshake<D>(
    conn: &mut ConnectionCommon<D>,
    sock: &mut TcpStream,
    timeout: Option<Duration>,
    peer: &str,
    tls: &PinnedTls,
) -> Result<()> {
    let deadline = timeout.map(|t| (Instant::now() + t, t));
    let late = |t: Duration| ProtocolError::Timeout {
        detail: format!("TLS handshake not complete within {t:?} ({peer})"),
    };
    let doing = "the TLS handshake";
    loop {
        if let Some((at, t)) = deadline {
            let left = at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(late(t));
            }
            sock.set_read_timeout(Some(left))
                .and_then(|_| sock.set_write_timeout(Some(left)))
                .map_err(|e| setup_error(e, "setting the handshake timeout"))?;
        }
        let timed_out = |e: &io::Error| {
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) && deadline.is_some_and(|(at, _)| Instant::now() >= at)
        };
        if conn.wants_write() {
            match conn.write_tls(sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if timed_out(&e) => {
                    return Err(late(deadline.map_or_else(Duration::default, |d| d.1)))
                }
                Err(e) => return Err(io_error(e, peer, doing, false)),
            }
            continue;
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        match conn.read_tls(sock) {
            Ok(0) => {
                return Err(ProtocolError::Closed {
                    detail: format!(
                        "{peer} closed the connection during the TLS handshake (it may have refused this \
                         side's certificate, or not speak TLS)"
                    ),
                    mid_frame: false,
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if timed_out(&e) => {
                return Err(late(deadline.map_or_else(Duration::default, |d| d.1)))
            }
            Err(e) => return Err(io_error(e, peer, doing, false)),
        }
        if let Err(e) = conn.process_new_packets() {
            // Tell the peer why (the alert is queued by rustls), then stop reading.
            while conn.wants_write() {
                if conn.write_tls(sock).is_err() {
                    break;
                }
            }
            let _ = sock.shutdown(std::net::Shutdown::Write);
            return Err(tls_failure(&e, peer, tls));
        }
    }
}
