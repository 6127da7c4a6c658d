//! Encoding speed of a 32×64×32×32 f32 tensor (8 MiB): encode, decode and validate, and full calls through the
//! in-process, Unix socket and TCP transports to an echo accelerator.
//!
//! cargo run --release -p asymml-protocol --example encode_speed

use std::hint::black_box;
use std::thread;
use std::time::{Duration, Instant};

use asymml_core::Tensor;
use asymml_protocol::*;

const SHAPE: [usize; 4] = [32, 64, 32, 32];

fn gbps(bytes: usize, iters: usize, secs: f64) -> f64 {
    (bytes * iters) as f64 / secs / 1e9
}

/// Runs `f` for about `budget` (at least 3 times) and returns (iterations, seconds).
fn time(budget: Duration, mut f: impl FnMut()) -> (usize, f64) {
    f(); // warm up
    let t0 = Instant::now();
    let mut n = 0;
    while n < 3 || t0.elapsed() < budget {
        f();
        n += 1;
    }
    (n, t0.elapsed().as_secs_f64())
}

fn echo(req: Request) -> Reply {
    match req {
        Request::ConvForward { layer, x_u, .. } => Reply::ConvOutput { layer, y_u: x_u },
        _ => Reply::Ok,
    }
}

fn call_speed<Tr: Transport>(name: &str, client: &mut Client<Tr>, x: &Tensor, payload: usize) {
    let (n, s) = time(Duration::from_secs(1), || {
        let req = Request::ConvForward {
            layer: 0,
            x_u: declassify_residual(x),
            train: false,
        };
        let y = client
            .call(&req)
            .unwrap()
            .into_conv_output(0)
            .unwrap()
            .into_tensor_checked(&SHAPE)
            .unwrap();
        black_box(y);
    });
    println!(
        "{name:<28} {:8.2} ms/call  {:6.2} GB/s (payload both ways: {:6.2} GB/s)",
        s / n as f64 * 1e3,
        gbps(payload, n, s),
        gbps(2 * payload, n, s)
    );
}

fn main() {
    let n: usize = SHAPE.iter().product();
    let x = Tensor::from_vec(&SHAPE, (0..n).map(|i| (i % 1013) as f32 * 1e-3).collect()).unwrap();
    let payload = n * 4;
    println!(
        "tensor {SHAPE:?}: {:.1} MiB of f32",
        payload as f64 / (1 << 20) as f64
    );

    let req = Request::ConvForward {
        layer: 0,
        x_u: declassify_residual(&x),
        train: true,
    };
    let mut buf = Vec::new();
    let budget = Duration::from_secs(1);

    let (it, s) = time(budget, || {
        encode_request(black_box(&req), MAX_MESSAGE, &mut buf).unwrap();
    });
    println!(
        "encode (reused buffer)       {:6.2} GB/s",
        gbps(payload, it, s)
    );

    let (it, s) = time(budget, || {
        let r = Request::ConvForward {
            layer: 0,
            x_u: declassify_residual(black_box(&x)),
            train: true,
        };
        encode_request(&r, MAX_MESSAGE, &mut buf).unwrap();
    });
    println!(
        "declassify + encode          {:6.2} GB/s",
        gbps(payload, it, s)
    );

    encode_request(&req, MAX_MESSAGE, &mut buf).unwrap();
    let (it, s) = time(budget, || {
        black_box(decode_request(black_box(&buf), MAX_MESSAGE).unwrap());
    });
    println!(
        "decode                       {:6.2} GB/s",
        gbps(payload, it, s)
    );

    let (it, s) = time(budget, || {
        let Request::ConvForward { x_u, .. } =
            decode_request(black_box(&buf), MAX_MESSAGE).unwrap()
        else {
            unreachable!()
        };
        black_box(x_u.into_tensor_checked(&SHAPE).unwrap());
    });
    println!(
        "decode + into_tensor_checked {:6.2} GB/s",
        gbps(payload, it, s)
    );

    let (it, s) = time(budget, || {
        let r = Request::ConvForward {
            layer: 0,
            x_u: declassify_residual(black_box(&x)),
            train: true,
        };
        encode_request(&r, MAX_MESSAGE, &mut buf).unwrap();
        let Request::ConvForward { x_u, .. } = decode_request(&buf, MAX_MESSAGE).unwrap() else {
            unreachable!()
        };
        black_box(x_u.into_tensor_checked(&SHAPE).unwrap());
    });
    println!(
        "round trip (declassify, encode, decode, check) {:6.2} GB/s, {:.2} ms",
        gbps(payload, it, s),
        s / it as f64 * 1e3
    );

    // Full calls: request out, reply back (the payload crosses twice).
    println!("\nfull ConvForward calls to an echo accelerator thread:");
    let (c, srv) = inproc_pair();
    let h = thread::spawn(move || serve(srv, &mut echo));
    let mut client = Client::connect(c).unwrap();
    call_speed("in-process", &mut client, &x, payload);
    client.shutdown().unwrap();
    h.join().unwrap().unwrap();

    #[cfg(unix)]
    {
        let dir = std::env::temp_dir().join(format!("asymml-encode-speed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let addr = Address::Unix(dir.join("a.sock"));
        let l = Listener::bind(&addr, TransportOptions::default()).unwrap();
        let h = thread::spawn(move || serve(l.accept_timeout(Duration::from_secs(10))?, &mut echo));
        let mut client =
            Client::connect(connect(&addr, &TransportOptions::default()).unwrap()).unwrap();
        call_speed("unix socket", &mut client, &x, payload);
        client.shutdown().unwrap();
        h.join().unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    let l = Listener::bind(
        &Address::parse("tcp://127.0.0.1:0").unwrap(),
        TransportOptions::default(),
    )
    .unwrap();
    let addr = l.local_address().unwrap();
    let h = thread::spawn(move || serve(l.accept_timeout(Duration::from_secs(10))?, &mut echo));
    let mut client =
        Client::connect(connect(&addr, &TransportOptions::default()).unwrap()).unwrap();
    call_speed("tcp 127.0.0.1", &mut client, &x, payload);
    client.shutdown().unwrap();
    h.join().unwrap().unwrap();
}
