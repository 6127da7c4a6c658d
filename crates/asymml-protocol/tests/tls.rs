//! Mutual TLS 1.3 with pinned certificates: a conversation over it, peers refused for the wrong key on either
//! side before any message, plaintext peers, and the handshake, read and idle deadlines.
//!
//! Every test is bounded: servers run in threads with timeouts, sockets live on 127.0.0.1, and every thread
//! is joined.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use asymml_core::{error_chain, Tensor};
use asymml_protocol::*;

const T: Duration = Duration::from_secs(5);

fn opts() -> TransportOptions {
    TransportOptions::with_timeout(T)
}

/// A key pair and its self-signed certificate, as PEM: (certificate, key).
fn pair(name: &str) -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    (ck.cert.pem(), ck.key_pair.serialize_pem())
}

/// The two sides' settings from a trusted pair and an accelerator pair.
struct Keys {
    trusted: (String, String),
    accelerator: (String, String),
}

impl Keys {
    fn new() -> Self {
        Keys {
            trusted: pair("asymml-trusted"),
            accelerator: pair("asymml-accelerator"),
        }
    }

    /// The trusted side: its own pair, pinning `accelerator_cert`.
    fn trusted_pinning(&self, accelerator_cert: &str) -> TcpSecurity {
        let (c, k) = &self.trusted;
        TcpSecurity::Tls(
            PinnedTls::from_pem(c.as_bytes(), k.as_bytes(), accelerator_cert.as_bytes()).unwrap(),
        )
    }

    /// The accelerator: its own pair, pinning `trusted_cert`.
    fn accelerator_pinning(&self, trusted_cert: &str) -> TcpSecurity {
        let (c, k) = &self.accelerator;
        TcpSecurity::Tls(
            PinnedTls::from_pem(c.as_bytes(), k.as_bytes(), trusted_cert.as_bytes()).unwrap(),
        )
    }

    fn trusted(&self) -> TcpSecurity {
        self.trusted_pinning(&self.accelerator.0)
    }

    fn accelerator(&self) -> TcpSecurity {
        self.accelerator_pinning(&self.trusted.0)
    }
}

fn local() -> Address {
    Address::parse("tcp://127.0.0.1:0").unwrap()
}

/// Sends inputs back as outputs; `Ok` to everything else.
fn echo(req: Request) -> Reply {
    match req {
        Request::ConvForward { layer, x_u, .. } => Reply::ConvOutput { layer, y_u: x_u },
        _ => Reply::Ok,
    }
}

/// A TLS server (the accelerator side) serving one connection with `echo`.
fn tls_server(tcp: TcpSecurity, o: TransportOptions) -> (Address, thread::JoinHandle<Result<()>>) {
    let listener = Listener::bind_with(&local(), o, tcp).unwrap();
    assert!(listener.is_tls());
    let addr = listener.local_address().unwrap();
    let h = thread::spawn(move || {
        let t = listener.accept_timeout(T)?;
        serve(t, &mut echo)
    });
    (addr, h)
}

#[test]
fn a_conversation_over_tls_with_pinned_keys() {
    let keys = Keys::new();
    let (addr, server) = tls_server(keys.accelerator(), opts());
    let transport = connect_with(&addr, &opts(), &keys.trusted()).unwrap();
    assert!(transport.peer().starts_with("tcp://127.0.0.1:"));
    let mut client = Client::connect(transport).unwrap();
    // Frames of many TLS records (16 KiB each), in both directions, byte for byte.
    for n in [1usize, 3 * 1024, 700_000] {
        let hw = n.div_ceil(3).max(1);
        let x: Vec<f32> = (0..3 * hw).map(|i| (i % 101) as f32 - 50.0).collect();
        let t = Tensor::from_vec(&[1, 3, hw, 1], x).unwrap();
        let reply = client
            .call(&Request::ConvForward {
                layer: 0,
                x_u: declassify_input_untrusted_only(&t),
                train: false,
            })
            .unwrap();
        let Reply::ConvOutput { y_u, .. } = reply else {
            panic!("expected ConvOutput, got {}", reply.describe());
        };
        let y = y_u.into_tensor_checked(&[1, 3, hw, 1]).unwrap();
        assert_eq!(y.data, t.data, "{n}");
    }
    client.shutdown().unwrap();
    server.join().unwrap().unwrap();
}

#[test]
fn a_client_with_the_wrong_key_is_refused_before_any_message() {
    let keys = Keys::new();
    let intruder = Keys::new();
    let (addr, server) = tls_server(keys.accelerator(), opts());
    // The intruder knows (and pins) the accelerator's certificate, but has its own key pair.
    let attempt = connect_with(
        &addr,
        &opts(),
        &intruder.trusted_pinning(&keys.accelerator.0),
    )
    .and_then(Client::connect);
    let e = attempt.err().expect("the accelerator refuses the intruder");
    // The server never got to serve(): accepting (the TLS handshake) failed on the pin.
    let se = server.join().unwrap().unwrap_err();
    assert!(matches!(se, ProtocolError::Handshake(_)), "{se}");
    assert!(se.to_string().contains("other than the pinned one"), "{se}");
    // The client hears that it was refused (the alert, or the close right after the handshake).
    let msg = error_chain(&e);
    assert!(msg.contains("refused this side's certificate"), "{msg}");
}

#[test]
fn a_server_with_the_wrong_key_is_refused_before_any_message() {
    let keys = Keys::new();
    let impostor = Keys::new();
    // The impostor pins the real trusted certificate but presents its own.
    let (addr, server) = tls_server(impostor.accelerator_pinning(&keys.trusted.0), opts());
    let e = connect_with(&addr, &opts(), &keys.trusted())
        .err()
        .expect("the trusted side refuses the impostor");
    assert!(matches!(e, ProtocolError::Handshake(_)), "{e}");
    assert!(e.to_string().contains("other than the pinned one"), "{e}");
    let se = server.join().unwrap().unwrap_err();
    assert!(
        error_chain(&se).contains("refused this side's certificate"),
        "{}",
        error_chain(&se)
    );
}

#[test]
fn a_plaintext_client_against_a_tls_server_fails_cleanly() {
    let keys = Keys::new();
    let (addr, server) = tls_server(keys.accelerator(), opts());
    let e = connect(&addr, &opts())
        .and_then(Client::connect)
        .err()
        .expect("a plaintext Hello is not TLS");
    let se = server.join().unwrap().unwrap_err();
    assert!(
        se.to_string().contains("does not speak TLS"),
        "{}",
        error_chain(&se)
    );
    // The client's error is a protocol error (the alert read as a frame, or the close), not a hang.
    assert!(
        matches!(
            e.root(),
            ProtocolError::Closed { .. }
                | ProtocolError::TooLarge { .. }
                | ProtocolError::Io { .. }
                | ProtocolError::Truncated { .. }
                | ProtocolError::UnknownType { .. }
        ),
        "{}",
        error_chain(&e)
    );
}

#[test]
fn a_tls_client_against_a_plaintext_server_fails_cleanly() {
    let keys = Keys::new();
    let listener = Listener::bind(&local(), opts()).unwrap();
    let addr = listener.local_address().unwrap();
    let server = thread::spawn(move || {
        let t = listener.accept_timeout(T)?;
        serve(t, &mut echo)
    });
    let e = connect_with(&addr, &opts(), &keys.trusted())
        .err()
        .expect("a plaintext server answers no ClientHello");
    assert!(
        matches!(
            e,
            ProtocolError::Handshake(_) | ProtocolError::Closed { .. } | ProtocolError::Io { .. }
        ),
        "{e}"
    );
    // The server refused the ClientHello as an over-long Hello frame.
    let se = server.join().unwrap().unwrap_err();
    assert!(
        matches!(se.root(), ProtocolError::TooLarge { .. }),
        "{}",
        error_chain(&se)
    );
}

/// A connection that sends nothing, or trickles a TLS record a byte at a time, is dropped once the handshake
/// timeout (the listener's connect timeout) has passed.
#[test]
fn the_tls_handshake_is_bounded_by_the_handshake_timeout() {
    let keys = Keys::new();
    let o = TransportOptions {
        connect_timeout: Some(Duration::from_millis(300)),
        ..opts()
    };
    let listener = Listener::bind_with(&local(), o, keys.accelerator()).unwrap();
    let addr = listener.local_address().unwrap().to_string();
    let hp = addr.trim_start_matches("tcp://").to_string();

    // Silent.
    let silent = TcpStream::connect(&hp).unwrap();
    let e = listener.accept_timeout(T).err().unwrap();
    assert!(matches!(e, ProtocolError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("TLS handshake"), "{e}");
    drop(silent);

    // Trickling: a handshake record header announcing 16 KiB, then one byte every 50 ms (each byte within the
    // read timeout, the whole far beyond the handshake timeout).
    let trickler = thread::spawn(move || {
        let mut s = TcpStream::connect(&hp).unwrap();
        let _ = s.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00]);
        for _ in 0..200 {
            if s.write_all(&[0]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
    });
    let e = listener.accept_timeout(T).err().unwrap();
    assert!(matches!(e, ProtocolError::Timeout { .. }), "{e}");
    drop(listener);
    trickler.join().unwrap();
}

/// The trusted side's handshake is bounded by its connect timeout: a server that accepts and says nothing.
#[test]
fn the_client_handshake_is_bounded_by_the_connect_timeout() {
    let keys = Keys::new();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = Address::parse(&format!("tcp://{}", l.local_addr().unwrap())).unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        // Read until the client gives up.
        let mut sink = [0u8; 4096];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    });
    let o = TransportOptions {
        connect_timeout: Some(Duration::from_millis(300)),
        ..opts()
    };
    let e = connect_with(&addr, &o, &keys.trusted()).err().unwrap();
    assert!(matches!(e, ProtocolError::Timeout { .. }), "{e}");
    server.join().unwrap();
}

/// After the handshake, the read timeout (client) and the idle timeout (server) still hold over TLS.
#[test]
fn read_and_idle_timeouts_hold_over_tls() {
    let keys = Keys::new();
    // A server that completes the TLS handshake and then never answers.
    let listener = Listener::bind_with(&local(), opts(), keys.accelerator()).unwrap();
    let addr = listener.local_address().unwrap();
    let mute = thread::spawn(move || {
        let mut t = listener.accept_timeout(T).unwrap();
        // Wait for the client to give up (its Hello arrives, then the close).
        let mut buf = Vec::new();
        let _ = t.recv_into(&mut buf);
        let _ = t.recv_into(&mut buf);
    });
    let o = TransportOptions {
        read_timeout: Some(Duration::from_millis(300)),
        frame_timeout: Some(Duration::from_millis(300)),
        ..opts()
    };
    let e = connect_with(&addr, &o, &keys.trusted())
        .and_then(Client::connect)
        .err()
        .unwrap();
    assert!(
        matches!(e.root(), ProtocolError::Timeout { .. }),
        "{}",
        error_chain(&e)
    );
    mute.join().unwrap();

    // A client silent after the handshake is dropped after the idle timeout.
    let listener = Listener::bind_with(&local(), opts(), keys.accelerator()).unwrap();
    let addr = listener.local_address().unwrap();
    let server = thread::spawn(move || {
        let t = listener.accept_timeout(T)?;
        let so = ServeOptions {
            handshake_timeout: Some(Duration::from_millis(300)),
            idle_timeout: Some(Duration::from_millis(300)),
            ..ServeOptions::default()
        };
        serve_opts(t, &so, &mut echo)
    });
    let client = Client::connect(connect_with(&addr, &opts(), &keys.trusted()).unwrap()).unwrap();
    let e = server.join().unwrap().unwrap_err();
    assert!(
        matches!(e.root(), ProtocolError::Timeout { .. }),
        "{}",
        error_chain(&e)
    );
    drop(client);
}

/// Accepting does not wait for the handshake: with one connection silent before its handshake, the next
/// is accepted and served while the first one's handshake is pending on its own thread.
#[test]
fn a_pending_handshake_blocks_no_other_connection() {
    let keys = Keys::new();
    let o = TransportOptions {
        connect_timeout: Some(T),
        ..opts()
    };
    let listener = Listener::bind_with(&local(), o, keys.accelerator()).unwrap();
    let addr = listener.local_address().unwrap();
    let hp = addr.to_string().trim_start_matches("tcp://").to_string();
    let silent = TcpStream::connect(&hp).unwrap();
    let first = listener.accept_pending().unwrap();
    assert!(first.peer().starts_with("tcp://127.0.0.1:"));
    let first = thread::spawn(move || first.establish().map(|_| ()));
    let good = {
        let addr = addr.clone();
        let tcp = keys.trusted();
        thread::spawn(move || -> Result<()> {
            let mut c = Client::connect(connect_with(&addr, &opts(), &tcp)?)?;
            c.call(&Request::Step { lr: 0.1 })?;
            c.shutdown().map(|_| ())
        })
    };
    let second = listener.accept_pending().unwrap().establish().unwrap();
    serve(second, &mut echo).unwrap();
    good.join().unwrap().unwrap();
    // The silent one goes away; its handshake then fails (closed) on its own thread.
    drop(silent);
    assert!(first.join().unwrap().is_err());
}

#[test]
fn keys_load_from_a_folder_by_role() {
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: &str| std::fs::write(dir.path().join(name), pem).unwrap();
    write(Role::Trusted.cert_file(), &keys.trusted.0);
    write(Role::Trusted.key_file(), &keys.trusted.1);
    write(Role::Accelerator.cert_file(), &keys.accelerator.0);
    write(Role::Accelerator.key_file(), &keys.accelerator.1);
    let trusted = PinnedTls::load(dir.path(), Role::Trusted).unwrap();
    let accelerator = PinnedTls::load(dir.path(), Role::Accelerator).unwrap();
    assert!(trusted.pinned_from().ends_with("accelerator.crt"));
    assert!(accelerator.pinned_from().ends_with("trusted.crt"));
    let (addr, server) = tls_server(TcpSecurity::Tls(accelerator), opts());
    let mut client =
        Client::connect(connect_with(&addr, &opts(), &TcpSecurity::Tls(trusted)).unwrap()).unwrap();
    client.call(&Request::Step { lr: 0.1 }).unwrap();
    client.shutdown().unwrap();
    server.join().unwrap().unwrap();

    // A missing file is named; a key that is not PEM is refused.
    std::fs::remove_file(dir.path().join("accelerator.crt")).unwrap();
    let e = PinnedTls::load(dir.path(), Role::Trusted).unwrap_err();
    assert!(error_chain(&e).contains("accelerator.crt"), "{e}");
    write("accelerator.crt", "not a certificate");
    let e = PinnedTls::load(dir.path(), Role::Trusted).unwrap_err();
    assert!(error_chain(&e).contains("accelerator.crt"), "{e}");
    // A key that does not belong to its certificate.
    let other = pair("other");
    let e = PinnedTls::from_pem(
        keys.trusted.0.as_bytes(),
        other.1.as_bytes(),
        keys.accelerator.0.as_bytes(),
    )
    .unwrap_err();
    assert!(matches!(e, ProtocolError::InvalidValue { .. }), "{e}");
}

#[test]
fn a_tls_client_keeps_many_large_requests_outstanding() {
    // The trusted end shares its TLS session between a writer and a reader thread: 12 requests of 4 MB, all
    // sent before the first reply is read, to a server that answers one at a time — no wait for good, and
    // every reply byte for byte.
    let keys = Keys::new();
    let (addr, server) = tls_server(keys.accelerator(), opts());
    let mut client =
        Client::connect(connect_with(&addr, &opts(), &keys.trusted()).unwrap()).unwrap();
    assert!(client.transport().queues_frames());
    let n = 1 << 20;
    let sent: Vec<Tensor> = (0..12)
        .map(|k| {
            Tensor::from_vec(&[n], (0..n).map(|i| ((i * 3 + k) % 89) as f32).collect()).unwrap()
        })
        .collect();
    for (k, t) in sent.iter().enumerate() {
        client
            .send_request(&Request::ConvForward {
                layer: k as u32,
                x_u: declassify_input_untrusted_only(t),
                train: false,
            })
            .unwrap();
    }
    for (k, t) in sent.iter().enumerate() {
        let Reply::ConvOutput { layer, y_u } = client.recv_reply().unwrap() else {
            panic!("reply {k}");
        };
        assert_eq!(layer, k as u32);
        assert_eq!(
            y_u.into_tensor_checked(&[n]).unwrap().data,
            t.data,
            "reply {k}"
        );
    }
    client.shutdown().unwrap();
    server.join().unwrap().unwrap();
}
