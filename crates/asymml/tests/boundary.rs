//! The trust boundary: a recorded transcript of a split training step holds only the messages the design
//! allows, and no payload equals (or correlates above 0.99 with) a private input or activation; a hostile or
//! broken accelerator gets a clear error naming the layer and the fault, never a panic.

use asymml_core::decomp::{BlockSvd, SvdMethod};
use asymml_core::layers::Conv2d;
use asymml_core::models::{ConvExec, LocalExec, ModelSpec, Net};
use asymml_core::rng::Rng;
use asymml_core::{error_chain, CoreError, Tensor};
use asymml_protocol::declassify::accelerator_result;
use asymml_protocol::{inproc_pair, serve, MessageKind, Recording, Reply, Request, Transport};
use asymml_trusted::split::{Basis, SplitConfig, SplitExec};
use asymml_untrusted::Service;

fn small_resnet() -> (Net, Tensor, Vec<usize>) {
    let mut spec = ModelSpec::parse("resnet18", 3, 10, 16).unwrap();
    spec.width = 8;
    let net = spec.build(5).unwrap();
    let mut rng = Rng::new(11);
    let x = Tensor::from_vec(
        &[4, 3, 16, 16],
        (0..4 * 3 * 256).map(|_| rng.normal()).collect(),
    )
    .unwrap();
    (net, x, vec![1, 7, 3, 3])
}

fn cfg(policy: &str, nsr: f32) -> SplitConfig {
    SplitConfig {
        policy: policy.parse().unwrap(),
        iters: 1,
        nsr,
        seed: 1,
        basis: Basis::PerSample,
        ..Default::default()
    }
}

/// Records every conv input and output of a trusted-only pass: the private activations.
struct Spy(Vec<Tensor>);

impl ConvExec for Spy {
    fn conv_forward(
        &mut self,
        c: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        t: bool,
    ) -> asymml_core::Result<()> {
        LocalExec.conv_forward(c, x, y, t)?;
        self.0.push(x.clone());
        self.0.push(y.clone());
        Ok(())
    }
    fn conv_backward(
        &mut self,
        c: &mut Conv2d,
        x: &Tensor,
        dy: &Tensor,
        dx: Option<&mut Tensor>,
    ) -> asymml_core::Result<()> {
        LocalExec.conv_backward(c, x, dy, dx)
    }
}

fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (
        a.iter().map(|&v| v as f64).sum::<f64>() / n,
        b.iter().map(|&v| v as f64).sum::<f64>() / n,
    );
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa == 0.0 || sbb == 0.0 {
        return 0.0;
    }
    sab / (saa * sbb).sqrt()
}

#[test]
fn transcript_of_a_split_step_holds_only_what_the_design_allows() {
    // (block: the block SVD, whose X_U goes straight into its frame a slab at a time; else the light SVD's,
    // sent from a whole residual. pipelined: the backward in two halves, ∇X first.)
    for (policy, nsr, micro, block, pipelined) in [
        ("schedule", 0.0, 1, false, true),
        ("asym1", 0.0, 1, false, true),
        ("fixed:1", 0.1, 1, false, false),
        ("schedule", 0.0, 3, false, true),
        ("asym1", 0.1, 2, false, false),
        ("schedule", 0.0, 1, true, true),
        ("fixed:2", 0.0, 1, true, false),
    ] {
        let (mut net, x, labels) = small_resnet();
        // The private activations, from a trusted-only forward of the same net.
        let (mut twin, _, _) = small_resnet();
        let mut spy = Spy(vec![x.clone()]);
        twin.forward(&x, true, &mut spy).unwrap();
        let private = spy.0;

        let (client, server) = inproc_pair();
        let server = std::thread::spawn(move || Service::new(1).unwrap().serve(server));
        let rec = Recording::new(client);
        let transcript = rec.transcript();
        let config = SplitConfig {
            micro_batches: micro,
            svd: block.then(|| SvdMethod::Block(BlockSvd::default())),
            pipelined_backward: pipelined,
            ..cfg(policy, nsr)
        };
        let mut exec = SplitExec::connect(rec, &mut net, config).unwrap();
        let stats = exec.stats();
        net.zero_grad();
        net.forward_loss(&x, &labels, true, &mut exec).unwrap();
        net.backward(&mut exec, false).unwrap();
        asymml_core::models::ConvExec::after_update(&mut exec, &mut net).unwrap();
        exec.shutdown().unwrap();
        server.join().unwrap().unwrap();

        let records = transcript.records();
        assert!(records.len() > 10);
        let halves = records
            .iter()
            .filter(|r| r.kind == Some(MessageKind::ConvInputGrad))
            .count();
        assert_eq!(
            halves > 0,
            pipelined,
            "{policy}: ConvInputGrad sent {halves} time(s)"
        );
        let allowed = [
            MessageKind::Hello,
            MessageKind::Register,
            MessageKind::ConvForward,
            MessageKind::ConvForwardPart,
            MessageKind::ConvForwardShared,
            MessageKind::ConvBackward,
            MessageKind::ConvInputGrad,
            MessageKind::ConvWeightGrad,
            MessageKind::SetWeights,
            MessageKind::Shutdown,
        ];
        let mut checked = 0;
        for r in records
            .iter()
            .filter(|r| r.direction == asymml_protocol::Direction::Sent)
        {
            let kind = r.kind.expect("every frame we sent decodes");
            assert!(allowed.contains(&kind), "{kind} left the trusted runtime");
            for t in &r.tensors {
                let field_ok = match kind {
                    MessageKind::Register => t.field == "w" || t.field == "b",
                    MessageKind::ConvForward | MessageKind::ConvForwardPart => t.field == "x_u",
                    MessageKind::ConvBackward | MessageKind::ConvInputGrad => t.field == "dy",
                    MessageKind::SetWeights => t.field == "w" || t.field == "b",
                    _ => false,
                };
                assert!(field_ok, "{kind} carried a tensor in field {}", t.field);
                for p in private.iter().filter(|p| p.len() == t.data.len()) {
                    assert_ne!(
                        p.data, t.data,
                        "{kind} (layer {:?}) sent a private tensor verbatim",
                        r.layer
                    );
                    let c = correlation(&p.data, &t.data);
                    assert!(
                        c.abs() < 0.99,
                        "{kind} (layer {:?}) correlates {c:.4} with a private tensor",
                        r.layer
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 0, "no payload was compared");
        let in_frame = stats.lock().unwrap().in_frame_forwards;
        assert_eq!(in_frame > 0, block, "{policy}: X_U written into its frame");
        // A pipelined forward sends its parts, and only them.
        let sent = |k| {
            records
                .iter()
                .filter(|r| r.direction == asymml_protocol::Direction::Sent && r.kind == Some(k))
                .count()
        };
        if micro > 1 {
            assert!(sent(MessageKind::ConvForwardPart) > 0, "{policy}: no parts");
            assert_eq!(sent(MessageKind::ConvForward), 0, "{policy}: a whole batch");
        } else {
            assert_eq!(sent(MessageKind::ConvForwardPart), 0);
        }
    }
}

/// Runs a fake accelerator answering Register and SetWeights with Ok and everything else with `reply(request)`.
fn hostile(reply: impl Fn(&Request) -> Option<Reply> + Send + 'static) -> Result<(), CoreError> {
    let (client, server) = inproc_pair();
    std::thread::spawn(move || {
        let _ = serve(server, &mut |req| match req {
            Request::Register { .. } | Request::SetWeights { .. } => Reply::Ok,
            other => reply(&other).unwrap_or_else(|| Reply::error("refused")),
        });
    });
    let (mut net, x, labels) = small_resnet();
    let mut exec = SplitExec::connect(client, &mut net, cfg("schedule", 0.0))?;
    net.forward_loss(&x, &labels, true, &mut exec)?;
    Ok(())
}

fn expect_err(r: Result<(), CoreError>, needles: &[&str]) {
    let msg = error_chain(&r.expect_err("the bad reply was accepted"));
    for n in needles {
        assert!(msg.contains(n), "'{n}' missing from: {msg}");
    }
}

#[test]
fn hostile_replies_are_refused_with_the_layer_and_the_fault() {
    let shaped = |shape: &[usize], v: f32| {
        accelerator_result(&Tensor::from_vec(shape, vec![v; shape.iter().product()]).unwrap())
    };
    // Wrong shape.
    expect_err(
        hostile(move |r| match r {
            Request::ConvForward { layer, .. } => Some(Reply::ConvOutput {
                layer: *layer,
                y_u: shaped(&[4, 8, 16, 15], 0.0),
            }),
            _ => None,
        }),
        &["(conv conv1): ConvForward(layer 0)", "wrong shape"],
    );
    // NaN / Inf values.
    expect_err(
        hostile(move |r| match r {
            Request::ConvForward { layer, .. } => Some(Reply::ConvOutput {
                layer: *layer,
                y_u: shaped(&[4, 8, 16, 16], f32::NAN),
            }),
            _ => None,
        }),
        &["layer 0", "non-finite"],
    );
    // A reply for another layer, a reply of the wrong kind, an error reply.
    expect_err(
        hostile(move |r| match r {
            Request::ConvForward { .. } => Some(Reply::ConvOutput {
                layer: 9,
                y_u: shaped(&[4, 8, 16, 16], 0.0),
            }),
            _ => None,
        }),
        &["layer 0"],
    );
    expect_err(hostile(|_| Some(Reply::Ok)), &["layer 0", "Ok"]);
    expect_err(hostile(|_| None), &["layer 0", "refused"]);
}

/// A fake accelerator that answers the handshake, Register and SetWeights, then writes `bytes` raw (or closes).
fn raw_server(bytes: Option<Vec<u8>>) -> Result<(), CoreError> {
    let (client, mut server) = inproc_pair();
    std::thread::spawn(move || {
        // Handshake, Register and the weights (one SetWeights per conv) through `serve` would keep the
        // connection; answer them by hand instead, up to the first ConvForward.
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            if server.recv_into(&mut buf).is_err() {
                return;
            }
            let rep = match asymml_protocol::decode_request(&buf, u32::MAX).unwrap() {
                Request::Hello { .. } => Reply::HelloAck {
                    version: asymml_protocol::PROTOCOL_VERSION,
                    max_message: 1 << 30,
                },
                Request::ConvForward { .. } => break,
                _ => Reply::Ok,
            };
            asymml_protocol::encode_reply(&rep, 1 << 30, &mut out).unwrap();
            server.send(&out).unwrap();
        }
        if let Some(b) = bytes {
            let _ = server.send(&b);
            let _ = server.recv_into(&mut buf);
        }
        drop(server);
    });
    let (mut net, x, labels) = small_resnet();
    let mut exec = SplitExec::connect(client, &mut net, cfg("schedule", 0.0))?;
    net.forward_loss(&x, &labels, true, &mut exec)?;
    Ok(())
}

#[test]
fn broken_frames_and_closed_connections_are_clear_errors() {
    // Unknown message type.
    expect_err(
        raw_server(Some(vec![3, 0, 0, 0, 0x7e, 0, 0])),
        &["layer 0", "type"],
    );
    // Truncated frame: the length prefix promises more than the body holds.
    expect_err(raw_server(Some(vec![1, 0, 0, 0])), &["layer 0"]);
    // The accelerator closes the connection instead of answering.
    expect_err(raw_server(None), &["layer 0", "closed"]);
    // A reply prefix far above the Y_U the request asked for (here 4 × 8 × 16 × 16 values) is refused as it
    // arrives, before any body is read or allocated.
    let huge = (900u32 << 20).to_le_bytes().to_vec();
    expect_err(
        raw_server(Some(huge)),
        &[
            "ConvForward(layer 0)",
            "943718400 bytes exceeds the maximum",
        ],
    );
}
