//! The transports carrying a conversation, the handshake, broken connections, recording.
//!
//! Every test is bounded: servers run in threads with read timeouts, sockets live on 127.0.0.1 or in a
//! temporary directory, and every thread is joined.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use asymml_core::{error_chain, Tensor};
use asymml_protocol::codec::{decode_reply, decode_request, encode_reply, encode_request};
use asymml_protocol::*;

const T: Duration = Duration::from_secs(5);

fn opts() -> TransportOptions {
    TransportOptions::with_timeout(T)
}

fn x(shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(shape, (0..n).map(|i| (i % 97) as f32 - 48.0).collect()).unwrap()
}

/// An echo-style accelerator: outputs are the inputs sent back, other requests get `Ok`.
fn echo(req: Request) -> Reply {
    match req {
        Request::ConvForward { layer, x_u, .. } => Reply::ConvOutput { layer, y_u: x_u },
        Request::ConvBackward { layer, dy, need_dx } => Reply::ConvGrads {
            layer,
            dx: need_dx.then_some(dy),
            dw: accelerator_result(&Tensor::zeros(&[2, 3, 1, 1])),
        },
        Request::FetchWeights { layer } => Reply::Weights {
            layer,
            w: accelerator_result(&Tensor::zeros(&[2, 3, 1, 1])),
            b: Some(accelerator_result(&Tensor::zeros(&[2]))),
        },
        Request::Step { lr } if lr < 0.0 => Reply::error(format!("negative learning rate {lr}")),
        _ => Reply::Ok,
    }
}

/// A short conversation covering the request kinds, split and pipelined calls, and a remote error.
fn exchange<Tr: Transport>(client: &mut Client<Tr>) {
    let spec = ConvLayerSpec {
        id: 0,
        in_ch: 3,
        out_ch: 2,
        k: 1,
        stride: 1,
        pad: 0,
        bias: true,
    };
    client
        .call(&Request::Register {
            layers: vec![spec],
            weights: vec![(
                public_weights(&Tensor::zeros(&[2, 3, 1, 1])),
                Some(public_weights(&Tensor::zeros(&[2]))),
            )],
        })
        .unwrap()
        .into_ok()
        .unwrap();

    let x_u = x(&[4, 3, 16, 16]);
    let y = client
        .call(&Request::ConvForward {
            layer: 0,
            x_u: declassify_residual(&x_u),
            train: true,
        })
        .unwrap()
        .into_conv_output(0)
        .unwrap()
        .into_tensor_checked(&[4, 3, 16, 16])
        .unwrap();
    assert_eq!(y, x_u);

    // Split: send two requests, then collect both replies in order.
    let dy = x(&[4, 2, 16, 16]);
    client
        .send_request(&Request::ConvBackward {
            layer: 0,
            dy: declassify_output_grad(&dy),
            need_dx: true,
        })
        .unwrap();
    client
        .send_request(&Request::SetWeights {
            layer: 0,
            w: declassify_updated_weights(&Tensor::zeros(&[2, 3, 1, 1])),
            b: None,
        })
        .unwrap();
    assert_eq!(client.pending(), 2);
    let dx = client
        .recv_reply()
        .unwrap()
        .into_conv_grads(0)
        .unwrap()
        .0
        .unwrap();
    assert_eq!(dx.into_tensor_checked(&[4, 2, 16, 16]).unwrap(), dy);
    client.recv_reply().unwrap().into_ok().unwrap();
    assert_eq!(client.pending(), 0);
    let e = client.recv_reply().unwrap_err();
    assert!(matches!(e, ProtocolError::Misuse(_)), "{e}");

    client
        .call(&Request::Step { lr: 0.1 })
        .unwrap()
        .into_ok()
        .unwrap();
    let e = client.call(&Request::Step { lr: -1.0 }).unwrap_err();
    assert_eq!(
        error_chain(&e),
        "Step: the accelerator answered: negative learning rate -1"
    );
    let (w, b) = client
        .call(&Request::FetchWeights { layer: 0 })
        .unwrap()
        .into_weights(0)
        .unwrap();
    assert_eq!(w.shape(), &[2, 3, 1, 1]);
    assert_eq!(b.unwrap().shape(), &[2]);
    // A reply for the wrong layer is refused by the typed accessor.
    let e = client
        .call(&Request::FetchWeights { layer: 0 })
        .unwrap()
        .into_weights(1)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("expected Weights(layer 1), got Weights(layer 0)"),
        "{e}"
    );
}

fn spawn_echo_server<Tr: Transport + Send + 'static>(server: Tr) -> thread::JoinHandle<Result<()>> {
    thread::spawn(move || serve(server, &mut echo))
}

/// An accelerator on a Unix socket in `dir`, serving one connection with `handler`.
#[cfg(unix)]
fn unix_server(
    dir: &std::path::Path,
    mut handler: impl FnMut(Request) -> Reply + Send + 'static,
) -> (Address, thread::JoinHandle<Result<()>>) {
    let addr = Address::parse(&format!("unix:{}", dir.join("accel.sock").display())).unwrap();
    let listener = Listener::bind(&addr, opts()).unwrap();
    let server = thread::spawn(move || {
        let t = listener.accept_timeout(T)?;
        serve(t, &mut handler)
    });
    (addr, server)
}

#[test]
fn inproc_exchange() {
    let (c, s) = inproc_pair_with(&opts());
    let server = spawn_echo_server(s);
    let mut client = Client::connect(c).unwrap();
    assert_eq!(client.max_message(), MAX_MESSAGE);
    exchange(&mut client);
    client.shutdown().unwrap();
    server.join().unwrap().unwrap();
}

#[cfg(unix)]
#[test]
fn unix_socket_exchange() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, server) = unix_server(dir.path(), echo);
    let mut client = Client::connect(connect(&addr, &opts()).unwrap()).unwrap();
    exchange(&mut client);
    client.shutdown().unwrap();
    server.join().unwrap().unwrap();
    // The listener removed its socket file.
    assert!(!dir.path().join("accel.sock").exists());
}

#[test]
fn tcp_exchange() {
    let listener = Listener::bind(&Address::parse("tcp://127.0.0.1:0").unwrap(), opts()).unwrap();
    let addr = listener.local_address().unwrap();
    assert!(addr.to_string().starts_with("tcp://127.0.0.1:"));
    let server = thread::spawn(move || {
        let t = listener.accept_timeout(T)?;
        serve(t, &mut echo)
    });
    let mut client = Client::connect(connect(&addr, &opts()).unwrap()).unwrap();
    assert!(client.transport().peer().starts_with("tcp://127.0.0.1:"));
    exchange(&mut client);
    client.shutdown().unwrap();
    server.join().unwrap().unwrap();
}

#[test]
fn server_stops_cleanly_when_the_client_hangs_up_between_messages() {
    let (c, s) = inproc_pair_with(&opts());
    let server = spawn_echo_server(s);
    let mut client = Client::connect(c).unwrap();
    client.call(&Request::Step { lr: 0.1 }).unwrap();
    drop(client);
    server.join().unwrap().unwrap();
}

#[test]
fn accept_timeout_is_bounded() {
    let listener = Listener::bind(&Address::parse("tcp://127.0.0.1:0").unwrap(), opts()).unwrap();
    let t0 = Instant::now();
    let e = listener
        .accept_timeout(Duration::from_millis(50))
        .err()
        .unwrap();
    assert!(matches!(e, ProtocolError::Timeout { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2));
}

// ----- a hand-written peer --------------------------------------------------------------------------------------

fn read_raw(s: &mut TcpStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut f = len.to_vec();
    f.resize(4 + u32::from_le_bytes(len) as usize, 0);
    s.read_exact(&mut f[4..]).unwrap();
    f
}

fn write_reply(s: &mut TcpStream, r: &Reply) {
    let mut f = Vec::new();
    encode_reply(r, MAX_MESSAGE, &mut f).unwrap();
    s.write_all(&f).unwrap();
}

/// A TCP "accelerator" that accepts the handshake, then runs `after` on the raw stream.
fn raw_server(after: impl FnOnce(TcpStream) + Send + 'static) -> (String, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let hello = decode_request(&read_raw(&mut s), MAX_MESSAGE).unwrap();
        assert!(matches!(hello, Request::Hello { .. }));
        write_reply(
            &mut s,
            &Reply::HelloAck {
                version: PROTOCOL_VERSION,
                max_message: MAX_MESSAGE,
            },
        );
        after(s);
    });
    (addr, h)
}

fn forward(layer: u32) -> Request {
    Request::ConvForward {
        layer,
        x_u: declassify_residual(&x(&[1, 2, 3, 3])),
        train: false,
    }
}

#[test]
fn peer_closing_mid_frame_is_a_clean_error() {
    let (addr, h) = raw_server(|mut s| {
        let _ = read_raw(&mut s);
        let mut f = Vec::new();
        encode_reply(
            &Reply::ConvOutput {
                layer: 1,
                y_u: accelerator_result(&x(&[1, 2, 3, 3])),
            },
            MAX_MESSAGE,
            &mut f,
        )
        .unwrap();
        s.write_all(&f[..f.len() / 2]).unwrap();
        // Dropping `s` closes the connection mid-frame.
    });
    let mut client = Client::connect(TcpTransport::connect(&addr, &opts()).unwrap()).unwrap();
    let e = client.call(&forward(1)).unwrap_err();
    h.join().unwrap();
    let s = error_chain(&e);
    assert!(e.is_closed(), "{s}");
    assert!(
        matches!(
            e.root(),
            ProtocolError::Closed {
                mid_frame: true,
                ..
            }
        ),
        "{s}"
    );
    assert!(
        s.starts_with("ConvForward(layer 1): connection closed"),
        "{s}"
    );
    assert!(s.contains("mid-frame"), "{s}");
}

#[test]
fn peer_closing_before_replying_is_a_clean_error() {
    let (addr, h) = raw_server(|mut s| {
        let _ = read_raw(&mut s);
    });
    let mut client = Client::connect(TcpTransport::connect(&addr, &opts()).unwrap()).unwrap();
    let e = client.call(&forward(2)).unwrap_err();
    h.join().unwrap();
    let s = error_chain(&e);
    assert!(
        s.starts_with("ConvForward(layer 2): connection closed"),
        "{s}"
    );
    // Sending on the dead connection is an error too (never a panic or a hang).
    assert!(client.call(&forward(2)).is_err());

    // The same over the in-process transport.
    let (c, s) = inproc_pair_with(&opts());
    let h = thread::spawn(move || {
        let mut s = s;
        let hello = s.recv().unwrap();
        assert!(decode_request(&hello, MAX_MESSAGE).is_ok());
        let mut f = Vec::new();
        encode_reply(
            &Reply::HelloAck {
                version: PROTOCOL_VERSION,
                max_message: MAX_MESSAGE,
            },
            MAX_MESSAGE,
            &mut f,
        )
        .unwrap();
        s.send(&f).unwrap();
        let _ = s.recv().unwrap();
    });
    let mut client = Client::connect(c).unwrap();
    let e = client.call(&forward(3)).unwrap_err();
    h.join().unwrap();
    let s = error_chain(&e);
    assert!(e.is_closed(), "{s}");
    assert!(
        s.starts_with("ConvForward(layer 3): connection closed"),
        "{s}"
    );
}

#[test]
fn silent_peer_times_out() {
    let (addr, h) = raw_server(|mut s| {
        let _ = read_raw(&mut s);
        thread::sleep(Duration::from_millis(400));
    });
    let o = TransportOptions {
        read_timeout: Some(Duration::from_millis(100)),
        ..opts()
    };
    let mut client = Client::connect(TcpTransport::connect(&addr, &o).unwrap()).unwrap();
    let t0 = Instant::now();
    let e = client.call(&forward(4)).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(matches!(e.root(), ProtocolError::Timeout { .. }), "{e}");
    assert!(
        error_chain(&e).starts_with("ConvForward(layer 4): connection timed out"),
        "{e}"
    );
    h.join().unwrap();
}

#[test]
fn client_closing_mid_frame_ends_serve_with_an_error() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let server = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        serve(TcpTransport::from_stream(s, &opts()).unwrap(), &mut echo)
    });
    let mut raw = TcpStream::connect(&addr).unwrap();
    raw.set_read_timeout(Some(T)).unwrap();
    let mut f = Vec::new();
    encode_request(
        &Request::Hello {
            version: PROTOCOL_VERSION,
            max_message: MAX_MESSAGE,
        },
        MAX_MESSAGE,
        &mut f,
    )
    .unwrap();
    raw.write_all(&f).unwrap();
    let _ack = read_raw(&mut raw);
    encode_request(&forward(0), MAX_MESSAGE, &mut f).unwrap();
    raw.write_all(&f[..10]).unwrap();
    drop(raw);
    let e = server.join().unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::Closed {
                mid_frame: true,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn malformed_request_gets_an_error_reply_and_the_server_goes_on() {
    let (mut c, s) = inproc_pair_with(&opts());
    let server = spawn_echo_server(s);
    let mut f = Vec::new();
    encode_request(
        &Request::Hello {
            version: PROTOCOL_VERSION,
            max_message: MAX_MESSAGE,
        },
        MAX_MESSAGE,
        &mut f,
    )
    .unwrap();
    c.send(&f).unwrap();
    assert!(matches!(
        decode_reply(&c.recv().unwrap(), MAX_MESSAGE).unwrap(),
        Reply::HelloAck { .. }
    ));
    // Unknown type byte, then a second Hello.
    c.send(&[1, 0, 0, 0, 0x55]).unwrap();
    let r = decode_reply(&c.recv().unwrap(), MAX_MESSAGE).unwrap();
    assert_eq!(
        r,
        Reply::error("malformed request: unknown request type byte 0x55")
    );
    c.send(&f).unwrap();
    let r = decode_reply(&c.recv().unwrap(), MAX_MESSAGE).unwrap();
    assert_eq!(r, Reply::error("handshake already done"));
    // Still serving.
    encode_request(&Request::Shutdown, MAX_MESSAGE, &mut f).unwrap();
    c.send(&f).unwrap();
    assert_eq!(
        decode_reply(&c.recv().unwrap(), MAX_MESSAGE).unwrap(),
        Reply::Ok
    );
    server.join().unwrap().unwrap();
}

// ----- handshake -------------------------------------------------------------------------------------------------

#[test]
fn version_mismatch_is_refused_by_the_server() {
    let (mut c, s) = inproc_pair_with(&opts());
    let server = spawn_echo_server(s);
    let mut f = Vec::new();
    encode_request(
        &Request::Hello {
            version: 99,
            max_message: MAX_MESSAGE,
        },
        MAX_MESSAGE,
        &mut f,
    )
    .unwrap();
    c.send(&f).unwrap();
    let r = decode_reply(&c.recv().unwrap(), MAX_MESSAGE).unwrap();
    let Reply::Error { message } = r else {
        panic!("{r:?}")
    };
    assert_eq!(
        message,
        format!(
            "protocol version mismatch: the accelerator speaks version {PROTOCOL_VERSION}, \
             the client speaks version 99"
        )
    );
    let e = server.join().unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::Version {
                ours: PROTOCOL_VERSION,
                theirs: 99
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("version 99"), "{e}");
}

#[test]
fn version_mismatch_is_refused_by_the_client() {
    let (c, mut s) = inproc_pair_with(&opts());
    let h = thread::spawn(move || {
        let _ = s.recv().unwrap();
        let mut f = Vec::new();
        encode_reply(
            &Reply::HelloAck {
                version: 7,
                max_message: MAX_MESSAGE,
            },
            MAX_MESSAGE,
            &mut f,
        )
        .unwrap();
        s.send(&f).unwrap();
    });
    let e = Client::connect(c).err().unwrap();
    h.join().unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "protocol version mismatch: this side speaks version {PROTOCOL_VERSION}, \
             the peer speaks version 7"
        )
    );

    // The error the server sends on a mismatch reaches the client as a handshake failure.
    let (c, mut s) = inproc_pair_with(&opts());
    let h = thread::spawn(move || {
        let _ = s.recv().unwrap();
        let mut f = Vec::new();
        encode_reply(
            &Reply::error("version mismatch: 3 vs 1"),
            MAX_MESSAGE,
            &mut f,
        )
        .unwrap();
        s.send(&f).unwrap();
    });
    let e = Client::connect(c).err().unwrap();
    h.join().unwrap();
    assert_eq!(e.to_string(), "handshake failed: version mismatch: 3 vs 1");
}

#[test]
fn first_message_must_be_hello() {
    let (mut c, s) = inproc_pair_with(&opts());
    let server = spawn_echo_server(s);
    let mut f = Vec::new();
    encode_request(&Request::Step { lr: 1.0 }, MAX_MESSAGE, &mut f).unwrap();
    c.send(&f).unwrap();
    let r = decode_reply(&c.recv().unwrap(), MAX_MESSAGE).unwrap();
    assert_eq!(r, Reply::error("expected Hello first, got Step"));
    let e = server.join().unwrap().unwrap_err();
    assert!(matches!(e, ProtocolError::Handshake(_)), "{e}");
}

#[test]
fn handshake_takes_the_smaller_maximum_and_it_is_enforced() {
    let (c, s) = inproc_pair_with(&opts());
    let server = thread::spawn(move || serve_with(s, 1 << 20, &mut echo));
    let mut client = Client::connect_with(c, 1 << 24).unwrap();
    assert_eq!(client.max_message(), 1 << 20);
    // 2 MiB of payload: refused on the client before anything is sent.
    let e = client.call(&forward_big(512 * 1024)).unwrap_err();
    assert!(
        matches!(e.root(), ProtocolError::TooLarge { max: 1048576, .. }),
        "{e}"
    );
    assert_eq!(client.pending(), 0);
    // The connection is still usable.
    client.call(&forward_big(1024)).unwrap();
    client.shutdown().unwrap();
    server.join().unwrap().unwrap();

    // The other way round: the client's maximum is the smaller.
    let (c, s) = inproc_pair_with(&opts());
    let server = thread::spawn(move || serve_with(s, 1 << 24, &mut echo));
    let client = Client::connect_with(c, 1000).unwrap();
    assert_eq!(client.max_message(), 1000);
    client.shutdown().unwrap();
    server.join().unwrap().unwrap();
}

fn forward_big(n: usize) -> Request {
    Request::ConvForward {
        layer: 0,
        x_u: declassify_residual(&Tensor::zeros(&[n])),
        train: false,
    }
}

#[test]
fn over_max_frame_is_refused_without_allocating() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        // A length prefix claiming 4 GiB - 1, then nothing.
        s.write_all(&u32::MAX.to_le_bytes()).unwrap();
        thread::sleep(Duration::from_millis(200));
    });
    let o = TransportOptions {
        max_message: 1 << 20,
        ..opts()
    };
    let mut t = TcpTransport::connect(&addr, &o).unwrap();
    let mut buf = Vec::new();
    let t0 = Instant::now();
    let e = t.recv_into(&mut buf).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(
        e.to_string(),
        "message of 4294967295 bytes exceeds the maximum of 1048576 bytes"
    );
    assert!(buf.capacity() < 1024, "allocated {} bytes", buf.capacity());
    h.join().unwrap();

    // The server refuses it too (before the handshake, anything above MAX_HELLO), says so, and stops (the
    // stream cannot be resynchronised).
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let server = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        serve_with(
            TcpTransport::from_stream(s, &opts()).unwrap(),
            1 << 20,
            &mut echo,
        )
    });
    let mut raw = TcpStream::connect(&addr).unwrap();
    raw.set_read_timeout(Some(T)).unwrap();
    raw.write_all(&(3u32 << 30).to_le_bytes()).unwrap();
    let e = server.join().unwrap().unwrap_err();
    let chain = error_chain(&e);
    assert!(chain.starts_with("handshake: "), "{chain}");
    assert!(
        chain.contains(&format!("exceeds the maximum of {MAX_HELLO} bytes")),
        "{chain}"
    );
    let reply = read_raw(&mut raw);
    match decode_reply(&reply, MAX_MESSAGE).unwrap() {
        Reply::Error { message } => assert!(message.contains("exceeds the maximum"), "{message}"),
        other => panic!("{}", other.describe()),
    }
}

#[test]
fn over_max_request_after_the_handshake_gets_an_error_reply() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let server = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        serve_with(
            TcpTransport::from_stream(s, &opts()).unwrap(),
            1 << 20,
            &mut echo,
        )
    });
    let mut client = Client::connect(TcpTransport::connect(&addr, &opts()).unwrap()).unwrap();
    client
        .transport_mut()
        .send(&(3u32 << 30).to_le_bytes())
        .unwrap();
    let mut buf = Vec::new();
    client.transport_mut().recv_into(&mut buf).unwrap();
    match decode_reply(&buf, MAX_MESSAGE).unwrap() {
        Reply::Error { message } => {
            assert!(
                message.contains("exceeds the maximum of 1048576 bytes"),
                "{message}"
            )
        }
        other => panic!("{}", other.describe()),
    }
    let e = server.join().unwrap().unwrap_err();
    assert!(matches!(e.root(), ProtocolError::TooLarge { .. }), "{e}");
}

/// A frame body's buffer grows with the bytes that arrive, not with its length prefix.
#[test]
fn a_huge_prefix_alone_allocates_little() {
    let (addr, h) = raw_server(|mut s| {
        // 1 GiB announced, 10 bytes sent, then the connection closes.
        s.write_all(&(1u32 << 30).to_le_bytes()).unwrap();
        s.write_all(&[7; 10]).unwrap();
    });
    let o = TransportOptions {
        max_message: MAX_MESSAGE,
        ..opts()
    };
    let mut client = Client::connect(TcpTransport::connect(&addr, &o).unwrap()).unwrap();
    let t = client.transport_mut();
    let mut buf = Vec::new();
    let e = t.recv_into(&mut buf).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::Closed {
                mid_frame: true,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("10 of 1073741824 bytes"), "{e}");
    assert!(
        buf.capacity() <= 2 * (READ_CHUNK + 4),
        "allocated {} bytes",
        buf.capacity()
    );
    h.join().unwrap();
}

/// A peer sending one byte at a time outlives a read timeout but not a frame timeout.
#[test]
fn a_trickling_peer_meets_the_frame_timeout() {
    let (addr, h) = raw_server(|mut s| {
        let _ = s.write_all(&100u32.to_le_bytes());
        for _ in 0..100 {
            if s.write_all(&[1]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
    });
    let o = TransportOptions {
        read_timeout: Some(Duration::from_secs(1)),
        frame_timeout: Some(Duration::from_millis(400)),
        ..opts()
    };
    let mut client = Client::connect(TcpTransport::connect(&addr, &o).unwrap()).unwrap();
    let t0 = Instant::now();
    let e = client
        .transport_mut()
        .recv_into(&mut Vec::new())
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(matches!(e, ProtocolError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("no complete frame within"), "{e}");
    drop(client);
    h.join().unwrap();
}

/// A connection that never says Hello is dropped after the handshake timeout, and one that goes silent after
/// it after the idle timeout.
#[test]
fn serve_opts_times_out_silent_clients() {
    let serve_one = |l: TcpListener| {
        thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let o = ServeOptions {
                handshake_timeout: Some(Duration::from_millis(300)),
                idle_timeout: Some(Duration::from_millis(300)),
                ..ServeOptions::default()
            };
            let t0 = Instant::now();
            let r = serve_opts(
                TcpTransport::from_stream(s, &TransportOptions::default()).unwrap(),
                &o,
                &mut echo,
            );
            (r, t0.elapsed())
        })
    };
    // Silent before Hello (half a prefix sent).
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let server = serve_one(l);
    let mut raw = TcpStream::connect(&addr).unwrap();
    raw.write_all(&[9, 0]).unwrap();
    let (r, took) = server.join().unwrap();
    let e = r.unwrap_err();
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(matches!(e.root(), ProtocolError::Timeout { .. }), "{e}");
    assert!(error_chain(&e).starts_with("handshake: "), "{e}");
    drop(raw);

    // Silent after the handshake.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let server = serve_one(l);
    let client = Client::connect(TcpTransport::connect(&addr, &opts()).unwrap()).unwrap();
    let (r, took) = server.join().unwrap();
    let e = r.unwrap_err();
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(matches!(e.root(), ProtocolError::Timeout { .. }), "{e}");
    drop(client);
}

/// The in-process transport's frame timeout bounds the wait for a frame like its read timeout.
#[test]
fn inproc_frame_timeout_bounds_the_wait() {
    let o = TransportOptions {
        frame_timeout: Some(Duration::from_millis(100)),
        ..TransportOptions::default()
    };
    let (mut c, _s) = inproc_pair_with(&o);
    let t0 = Instant::now();
    let e = c.recv_into(&mut Vec::new()).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(matches!(e, ProtocolError::Timeout { .. }), "{e}");
}

// ----- recording -------------------------------------------------------------------------------------------------

#[test]
fn recording_keeps_what_crossed() {
    let (c, s) = inproc_pair_with(&opts());
    let server = spawn_echo_server(s);
    let rec = Recording::new(c);
    let transcript = rec.transcript();
    let mut client = Client::connect(rec).unwrap();
    let x_u = x(&[2, 3, 4, 4]);
    let dy = x(&[2, 3, 4, 4]);
    client
        .call(&Request::ConvForward {
            layer: 5,
            x_u: declassify_residual(&x_u),
            train: true,
        })
        .unwrap();
    client
        .call(&Request::ConvBackward {
            layer: 5,
            dy: declassify_output_grad(&dy),
            need_dx: false,
        })
        .unwrap();
    assert_eq!(client.transport().records().len(), 6);
    client.shutdown().unwrap();
    server.join().unwrap().unwrap();

    let recs = transcript.records();
    let kinds: Vec<(Direction, MessageKind)> = recs
        .iter()
        .map(|r| (r.direction, r.kind.unwrap()))
        .collect();
    use Direction::*;
    use MessageKind as K;
    assert_eq!(
        kinds,
        [
            (Sent, K::Hello),
            (Received, K::HelloAck),
            (Sent, K::ConvForward),
            (Received, K::ConvOutput),
            (Sent, K::ConvBackward),
            (Received, K::ConvGrads),
            (Sent, K::Shutdown),
            (Received, K::Ok),
        ]
    );
    let sent_tensors: Vec<&RecordedTensor> = recs
        .iter()
        .filter(|r| r.direction == Sent)
        .flat_map(|r| &r.tensors)
        .collect();
    assert_eq!(sent_tensors.len(), 2);
    assert_eq!(sent_tensors[0].field, "x_u");
    assert_eq!(sent_tensors[0].shape, x_u.shape);
    assert_eq!(sent_tensors[0].data, x_u.data);
    assert_eq!(sent_tensors[1].field, "dy");
    assert_eq!(recs[2].layer, Some(5));
    assert_eq!(recs[3].tensors[0].field, "y_u");
    // ConvGrads without ∇X (not asked for) carries ∇W_U only.
    assert_eq!(recs[5].tensors.len(), 1);
    assert_eq!(recs[5].tensors[0].field, "dw");
    assert!(recs.iter().all(|r| r.error.is_none() && r.bytes >= 5));
    assert_eq!(transcript.take().len(), 8);
    assert!(transcript.is_empty());
}

#[test]
fn recording_notes_undecodable_frames() {
    let (a, mut b) = inproc_pair();
    let mut rec = Recording::new(a);
    rec.send(&[1, 0, 0, 0, 0x55]).unwrap();
    assert_eq!(b.recv().unwrap(), [1, 0, 0, 0, 0x55]);
    let r = &rec.records()[0];
    assert_eq!(r.kind, None);
    assert_eq!(r.error.as_deref(), Some("unknown message type byte 0x55"));
}

/// A frame of `len` bytes whose length prefix says so.
fn raw_frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..4].copy_from_slice(&((len - 4) as u32).to_le_bytes());
    f
}

#[test]
fn inproc_reuses_the_peers_buffers_but_drops_released_large_ones() {
    const BIG: usize = 1 << 20;
    // Sends `frames`, each received by the peer; returns the capacity of the buffer the last send left in hand
    // (the reused buffer the peer gave back, or an empty one).
    let run = |release_after_first: bool| {
        let (mut a, mut b) = inproc_pair();
        let mut buf = Vec::new();
        for (i, len) in [BIG, 64, 64].into_iter().enumerate() {
            let mut f = raw_frame(len);
            a.send_vec(&mut f).unwrap();
            b.recv_into(&mut buf).unwrap();
            assert_eq!(buf.len(), len);
            if i == 0 && release_after_first {
                a.release_buffers();
            }
            if i == 2 {
                return f.capacity();
            }
        }
        unreachable!()
    };
    // Kept: the large buffer comes back for the next frame (no fresh allocation).
    assert!(run(false) >= BIG);
    // Released: once the frames that follow are small, the large buffer the peer gives back is dropped.
    assert!(run(true) < BIG);
}

#[cfg(unix)]
#[test]
fn a_socket_client_keeps_many_large_requests_outstanding() {
    // 12 requests of 4 MB each (far more than the socket buffers hold), all sent before the first reply is
    // read, to an accelerator that answers one at a time and writes each reply before it reads on: the
    // trusted runtime's end queues both ways (a writer and a reader thread), so neither side waits for good.
    let dir = tempfile::tempdir().unwrap();
    let (addr, server) = unix_server(dir.path(), echo);
    let mut client = Client::connect(connect(&addr, &opts()).unwrap()).unwrap();
    assert!(client.transport().queues_frames());
    let n = 1 << 20;
    let sent: Vec<Tensor> = (0..12)
        .map(|k| {
            Tensor::from_vec(&[n], (0..n).map(|i| ((i * 7 + k) % 101) as f32).collect()).unwrap()
        })
        .collect();
    for (k, t) in sent.iter().enumerate() {
        client
            .send_request(&Request::ConvForward {
                layer: k as u32,
                x_u: declassify_residual(t),
                train: false,
            })
            .unwrap();
    }
    assert_eq!(client.pending(), 12);
    for (k, t) in sent.iter().enumerate() {
        match client.recv_reply().unwrap() {
            Reply::ConvOutput { layer, y_u } => {
                assert_eq!(layer, k as u32);
                assert_eq!(y_u.into_tensor_checked(&[n]).unwrap().data, t.data);
            }
            r => panic!("reply {k}: {r:?}"),
        }
    }
    client.shutdown().unwrap();
    server.join().unwrap().unwrap();
}

#[test]
fn a_queued_socket_reports_a_peer_that_closes_or_stays_silent() {
    // Closes after the first request: the reply's wait ends in a clean error, and so does every later one.
    let (addr, h) = raw_server(|mut s| {
        let _ = read_raw(&mut s);
    });
    let mut client = Client::connect(connect(&Address::Tcp(addr), &opts()).unwrap()).unwrap();
    assert!(client.transport().queues_frames());
    let e = client.call(&forward(4)).unwrap_err();
    assert!(matches!(e.root(), ProtocolError::Closed { .. }), "{e}");
    let e = client.call(&forward(5)).unwrap_err();
    assert!(
        matches!(e.root(), ProtocolError::Closed { .. }),
        "a later call: {e}"
    );
    h.join().unwrap();
    // Silent: no reply within the read timeout.
    let (addr, h) = raw_server(|mut s| {
        let _ = read_raw(&mut s);
        thread::sleep(Duration::from_millis(400));
    });
    let o = TransportOptions {
        read_timeout: Some(Duration::from_millis(100)),
        ..opts()
    };
    let mut client = Client::connect(connect(&Address::Tcp(addr), &o).unwrap()).unwrap();
    let t0 = Instant::now();
    let e = client.call(&forward(4)).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(matches!(e.root(), ProtocolError::Timeout { .. }), "{e}");
    h.join().unwrap();
    // A reply over the negotiated maximum is refused from its prefix.
    let (addr, h) = raw_server(|mut s| {
        let _ = read_raw(&mut s);
        let _ = s.write_all(&(MAX_MESSAGE + 1).to_le_bytes());
        thread::sleep(Duration::from_millis(200));
    });
    let mut client = Client::connect(connect(&Address::Tcp(addr), &opts()).unwrap()).unwrap();
    let e = client.call(&forward(4)).unwrap_err();
    assert!(matches!(e.root(), ProtocolError::TooLarge { .. }), "{e}");
    h.join().unwrap();
}

#[test]
fn a_queued_socket_reads_no_frame_it_did_not_ask_for() {
    // A hostile accelerator writes 64 frames of 1 MB that answer nothing: the trusted end reads one frame per
    // request sent, so the frames stay in the socket's buffers and the writer is stalled — they do not pile
    // up in the trusted runtime's memory.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let (addr, h) = raw_server(move |mut s| {
        s.set_write_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut frame = (1u32 << 20).to_le_bytes().to_vec();
        frame.resize(4 + (1 << 20), 0);
        let written = (0..64).take_while(|_| s.write_all(&frame).is_ok()).count();
        done_tx.send(written).unwrap();
    });
    let client = Client::connect(connect(&Address::Tcp(addr), &opts()).unwrap()).unwrap();
    let written = done_rx.recv_timeout(T).unwrap();
    assert!(
        written < 64,
        "all {written} unasked-for frames were taken off the socket"
    );
    drop(client);
    h.join().unwrap();
}

#[cfg(unix)]
#[test]
fn replies_read_ahead_are_held_to_their_own_requests_bounds() {
    // A small reply is due first (Step: `Ok` only), a 4 MB one after it; the reader takes both off the socket
    // ahead of the receives, each held to the bound its request was sent with. Then a Step answered by a
    // large frame is refused from its prefix, while a large reply to a request that expects one is not.
    let dir = tempfile::tempdir().unwrap();
    // Answers a Step with the output of a forward when its learning rate is 2.
    let (addr, server) = unix_server(dir.path(), |req| match req {
        Request::Step { lr: 2.0 } => Reply::ConvOutput {
            layer: 0,
            y_u: accelerator_result(&Tensor::zeros(&[1 << 20])),
        },
        r => echo(r),
    });
    let mut client = Client::connect(connect(&addr, &opts()).unwrap()).unwrap();
    let big = Tensor::from_vec(&[1 << 20], vec![1.5; 1 << 20]).unwrap();
    client.send_request(&Request::Step { lr: 0.1 }).unwrap();
    client
        .send_request(&Request::ConvForward {
            layer: 3,
            x_u: declassify_residual(&big),
            train: false,
        })
        .unwrap();
    thread::sleep(Duration::from_millis(200));
    assert!(matches!(client.recv_reply().unwrap(), Reply::Ok));
    match client.recv_reply().unwrap() {
        Reply::ConvOutput { layer: 3, y_u } => {
            assert_eq!(y_u.into_tensor_checked(&[1 << 20]).unwrap().data, big.data)
        }
        r => panic!("{r:?}"),
    }
    let e = client.call(&Request::Step { lr: 2.0 }).unwrap_err();
    assert!(matches!(e.root(), ProtocolError::TooLarge { .. }), "{e}");
    drop(client);
    let _ = server.join().unwrap();
}
