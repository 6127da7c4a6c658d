//! Integrity against a lying accelerator: a relay between the split runtime and a real accelerator service
//! that alters one element of Y_U, of ∇X, of ∇W_U, or of the weights the trusted runtime sends, at several
//! magnitudes — every change above the stated threshold is caught before the value is used, in every model
//! family — and honest runs across models, policies, thread counts and the shared basis raise no alarm.
//!
//! The relay is test-only code: nothing in the CLI can build it.

use asymml_core::decomp::{BlockSvd, RankPolicy, SvdMethod};
use asymml_core::models::{ConvExec, LocalExec, ModelSpec, Net};
use asymml_core::optim::{Optimizer, OptimizerKind};
use asymml_core::rng::Rng;
use asymml_core::{CoreError, Tensor};
use asymml_protocol::{
    accelerator_result, declassify_updated_weights, decode_reply, decode_request, encode_reply,
    encode_request, inproc_pair, InProcTransport, Reply, Request, Result as PResult, Transport,
    WireTensor, MAX_MESSAGE,
};
use asymml_trusted::split::{Basis, SplitConfig, SplitExec};
use asymml_untrusted::Service;

mod common;
use common::{asymml, SendHook};

/// What the relay changes, and by how much (a multiple of the tensor's RMS).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tamper {
    None,
    /// One element of Y_U (a `ConvOutput` reply).
    Output(f32),
    /// One element of ∇X (a `ConvGrads` or, in a pipelined backward, an `InputGrad` reply).
    InputGrad(f32),
    /// One element of ∇W_U (a `ConvGrads` or, in a pipelined backward, a `WeightGrad` reply).
    WeightGrad(f32),
    /// One element of the new weights on their way to the accelerator (`SetWeights`): the accelerator then
    /// computes with weights other than the trusted runtime's.
    Weights(f32),
}

/// A client transport that passes frames on, altering the first one its `Tamper` is about at conv `layer`.
struct Relay {
    inner: InProcTransport,
    tamper: Tamper,
    layer: u32,
    done: bool,
}

fn rms(v: &[f32]) -> f32 {
    (v.iter().map(|a| (a * a) as f64).sum::<f64>() / v.len().max(1) as f64).sqrt() as f32
}

/// `t` with element len/3 moved by `rel` × rms(t) (at least `rel`, for an all-zero tensor).
fn moved(t: &WireTensor, rel: f32) -> Tensor {
    let mut data = t.data().to_vec();
    let i = data.len() / 3;
    data[i] += rel * rms(t.data()).max(1.0e-3);
    Tensor::from_vec(t.shape(), data).unwrap()
}

impl Transport for Relay {
    fn send(&mut self, frame: &[u8]) -> PResult<()> {
        let mut v = frame.to_vec();
        self.send_vec(&mut v)
    }

    fn send_vec(&mut self, frame: &mut Vec<u8>) -> PResult<()> {
        if let (Tamper::Weights(rel), false) = (self.tamper, self.done) {
            if let Ok(Request::SetWeights { layer, w, b }) = decode_request(frame, MAX_MESSAGE) {
                if layer == self.layer {
                    self.done = true;
                    let req = Request::SetWeights {
                        layer,
                        w: declassify_updated_weights(&moved(&w, rel)),
                        b,
                    };
                    encode_request(&req, MAX_MESSAGE, frame)?;
                }
            }
        }
        self.inner.send_vec(frame)
    }

    fn recv_into(&mut self, buf: &mut Vec<u8>) -> PResult<()> {
        self.inner.recv_into(buf)?;
        if self.done {
            return Ok(());
        }
        let reply = match decode_reply(buf, MAX_MESSAGE) {
            Ok(r) => r,
            Err(_) => return Ok(()),
        };
        let altered = match (self.tamper, reply) {
            (Tamper::Output(rel), Reply::ConvOutput { layer, y_u }) if layer == self.layer => {
                Some(Reply::ConvOutput {
                    layer,
                    y_u: accelerator_result(&moved(&y_u, rel)),
                })
            }
            (
                Tamper::InputGrad(rel),
                Reply::ConvGrads {
                    layer,
                    dx: Some(dx),
                    dw,
                },
            ) if layer == self.layer => Some(Reply::ConvGrads {
                layer,
                dx: Some(accelerator_result(&moved(&dx, rel))),
                dw,
            }),
            (Tamper::WeightGrad(rel), Reply::ConvGrads { layer, dx, dw })
                if layer == self.layer =>
            {
                Some(Reply::ConvGrads {
                    layer,
                    dx,
                    dw: accelerator_result(&moved(&dw, rel)),
                })
            }
            (Tamper::InputGrad(rel), Reply::InputGrad { layer, dx }) if layer == self.layer => {
                Some(Reply::InputGrad {
                    layer,
                    dx: accelerator_result(&moved(&dx, rel)),
                })
            }
            (Tamper::WeightGrad(rel), Reply::WeightGrad { layer, dw }) if layer == self.layer => {
                Some(Reply::WeightGrad {
                    layer,
                    dw: accelerator_result(&moved(&dw, rel)),
                })
            }
            _ => None,
        };
        if let Some(r) = altered {
            self.done = true;
            encode_reply(&r, MAX_MESSAGE, buf)?;
        }
        Ok(())
    }

    fn max_message(&self) -> u32 {
        self.inner.max_message()
    }

    fn set_max_message(&mut self, max: u32) {
        self.inner.set_max_message(max)
    }

    fn peer(&self) -> String {
        format!("relay to {}", self.inner.peer())
    }

    fn queues_frames(&self) -> bool {
        self.inner.queues_frames()
    }
}

/// A small model of each family, a batch and its labels.
fn model(name: &str) -> (Net, Tensor, Vec<usize>) {
    // VGG pools five times: 32 px; ResNet (CIFAR style) works at 16.
    let size = if name.starts_with("vgg") { 32 } else { 16 };
    let mut spec = ModelSpec::parse(name, 3, 10, size).unwrap();
    spec.width = 8;
    let net = spec.build(5).unwrap();
    let mut rng = Rng::new(11);
    let n = 4 * 3 * size * size;
    let x = Tensor::from_vec(&[4, 3, size, size], (0..n).map(|_| rng.normal()).collect()).unwrap();
    (net, x, vec![1, 7, 3, 3])
}

const SGD: OptimizerKind = OptimizerKind::Sgd {
    momentum: 0.9,
    nesterov: false,
};

/// `steps` training steps (forward, backward, the trusted optimizer, the new weights sent) through a relay
/// that applies `tamper` at conv `layer`; returns the first error and the executor's integrity counters.
fn run(
    name: &str,
    cfg: SplitConfig,
    tamper: Tamper,
    layer: u32,
    steps: usize,
) -> (
    Result<(), CoreError>,
    asymml_trusted::integrity::IntegrityStats,
) {
    let (res, stats) = run_all_stats(name, cfg, tamper, layer, steps);
    (res, stats.integrity)
}

/// [`run`], returning all the executor's counters.
fn run_all_stats(
    name: &str,
    cfg: SplitConfig,
    tamper: Tamper,
    layer: u32,
    steps: usize,
) -> (Result<(), CoreError>, asymml_trusted::split::SplitStats) {
    let (mut net, x, labels) = model(name);
    let (client, server) = inproc_pair();
    let service = std::thread::spawn(move || Service::new(1).unwrap().serve(server));
    let relay = Relay {
        inner: client,
        tamper,
        layer,
        done: false,
    };
    let mut exec = SplitExec::connect(relay, &mut net, cfg).unwrap();
    if let Some(bytes) = LEAN_V.with(|l| l.get()) {
        exec.set_lean_v_bytes(bytes);
    }
    let stats = exec.stats();
    let mut opt = Optimizer::new(SGD, 5e-4);
    let result = (|| {
        for _ in 0..steps {
            net.zero_grad();
            net.forward_loss(&x, &labels, true, &mut exec)?;
            net.backward(&mut exec, false)?;
            opt.begin_step();
            let mut i = 0;
            net.visit_params(&mut |_, p| {
                opt.update(i, p, 0.01);
                i += 1;
            });
            exec.after_update(&mut net)?;
        }
        // One more forward: it uses the weights sent by the last update.
        net.forward(&x, false, &mut exec)?;
        Ok(())
    })();
    let _ = exec.shutdown();
    let _ = service.join();
    let stats = stats.lock().unwrap().clone();
    (result, stats)
}

thread_local! {
    /// `SplitExec::set_lean_v_bytes` for the executors [`run_all_stats`] makes on this thread (None: default).
    static LEAN_V: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The block SVD (the CLI's default).
fn block_svd() -> SvdMethod {
    SvdMethod::Block(BlockSvd::default())
}

fn cfg(policy: &str, shared_basis: bool, nsr: f32) -> SplitConfig {
    SplitConfig {
        policy: policy.parse().unwrap(),
        basis: if shared_basis {
            Basis::Shared
        } else {
            Basis::PerSample
        },
        nsr,
        seed: 3,
        ..Default::default()
    }
}

#[test]
fn every_tampered_result_or_weight_is_caught() {
    for name in ["vgg11", "resnet18"] {
        for layer in [0u32, 3] {
            for rel in [1.0f32, 0.1] {
                for tamper in [
                    Tamper::Output(rel),
                    Tamper::InputGrad(rel),
                    Tamper::WeightGrad(rel),
                    Tamper::Weights(rel),
                ] {
                    // ∇X of the first conv is never asked for (the network's input needs no gradient).
                    if layer == 0 && matches!(tamper, Tamper::InputGrad(_)) {
                        continue;
                    }
                    // The light SVD's X_U goes whole through a scratch tensor; the block SVD's straight into
                    // its frame, checked slab by slab as it is made.
                    // The backward pipelined (∇X in an `InputGrad`, ∇W_U in a `WeightGrad` checked at the next
                    // split conv) or in one `ConvGrads`.
                    for (svd, pipelined) in [
                        (None, true),
                        (Some(block_svd()), true),
                        (Some(block_svd()), false),
                    ] {
                        let cfg = SplitConfig {
                            svd,
                            pipelined_backward: pipelined,
                            ..cfg("schedule", false, 0.0)
                        };
                        let (res, stats) = run(name, cfg, tamper, layer, 2);
                        let err = res.expect_err(&format!(
                            "{name}: {tamper:?} at conv {layer} passed ({svd:?}, pipelined {pipelined})"
                        ));
                        assert!(
                            matches!(err, CoreError::Integrity { .. }),
                            "{name}: {tamper:?} at conv {layer}: not an integrity error: {err}"
                        );
                        assert_eq!(stats.failures, 1, "{name}: {tamper:?}");
                        eprintln!("{name} {tamper:?} conv {layer} ({svd:?}, {pipelined}): {err}");
                    }
                }
            }
        }
    }
}

#[test]
fn a_conv_back_from_the_trusted_route_gets_its_new_weights_before_it_splits() {
    // Energy 0.9999 at conv 0 (3 input channels): a noise batch keeps every channel (the conv runs wholly in
    // the trusted runtime), a batch whose channels are multiples of one map keeps one (the conv splits). A
    // conv on the trusted route keeps its updated weights here — nothing of it is sent — and sends them when it
    // next splits: with checks on, a split forward on the accelerator's older weights would fail its check.
    let (mut net, noise, labels) = model("vgg11");
    let map: Vec<f32> = noise.data[..noise.data.len() / 3].to_vec();
    let mut low = noise.clone();
    let plane = 32 * 32;
    for (i, v) in low.data.iter_mut().enumerate() {
        let (sample, c, p) = (i / (3 * plane), (i / plane) % 3, i % plane);
        *v = (c as f32 + 1.0) * map[sample * plane + p];
    }
    let (client, server) = inproc_pair();
    let service = std::thread::spawn(move || Service::new(1).unwrap().serve(server));
    let cfg = SplitConfig {
        policy: RankPolicy::Energy(0.9999),
        ..cfg("schedule", false, 0.0)
    };
    let mut exec = SplitExec::connect(client, &mut net, cfg).unwrap();
    let stats = exec.stats();
    let conv0 = |s: &asymml_trusted::split::SplitStats| {
        s.layers
            .first()
            .map_or((false, 0), |l| (l.trusted_route, l.bytes_to))
    };
    let mut opt = Optimizer::new(SGD, 5e-4);
    let mut routes = Vec::new();
    for step in 0..5 {
        let x = if step % 2 == 0 { &noise } else { &low };
        let sent_before = conv0(&stats.lock().unwrap()).1;
        net.zero_grad();
        net.forward_loss(x, &labels, true, &mut exec).unwrap();
        net.backward(&mut exec, false).unwrap();
        opt.begin_step();
        let mut i = 0;
        net.visit_params(&mut |_, p| {
            opt.update(i, p, 0.05);
            i += 1;
        });
        exec.after_update(&mut net).unwrap();
        let (trusted, sent) = conv0(&stats.lock().unwrap());
        // On the trusted route nothing of conv 0 was sent in the step, not even its new weights.
        assert_eq!(trusted, sent == sent_before, "step {step}");
        routes.push(trusted);
    }
    assert_eq!(routes, [true, false, true, false, true]);
    // The split forward after a trusted step checked out against the trusted weights.
    net.forward(&low, false, &mut exec).unwrap();
    let integrity = stats.lock().unwrap().integrity.clone();
    assert_eq!(integrity.failures, 0);
    assert!(integrity.checks > 0);
    exec.shutdown().unwrap();
    service.join().unwrap().unwrap();
}

#[test]
fn a_lie_at_a_resnet_shortcut_conv_is_caught() {
    // The shortcut (1 × 1, stride 2) is checked from the pixels of its block input's X_U that it reads, kept
    // in place of the whole X_U; its ∇W_U check takes the projection spread back over the whole map.
    let cfg = || SplitConfig {
        svd: Some(block_svd()),
        ..cfg("fixed:2", false, 0.0)
    };
    let (res, all) = run_all_stats("resnet18", cfg(), Tamper::None, 0, 1);
    res.unwrap();
    let shortcut = all
        .layers
        .iter()
        .position(|l| l.name == "layer2.0.downsample.0")
        .expect("resnet18 has a shortcut conv") as u32;
    assert!(
        !all.layers[shortcut as usize].trusted_route,
        "the shortcut split"
    );
    for tamper in [
        Tamper::Output(0.1),
        Tamper::InputGrad(0.1),
        Tamper::WeightGrad(0.1),
    ] {
        let (res, stats) = run("resnet18", cfg(), tamper, shortcut, 2);
        let err = res.expect_err(&format!("{tamper:?} at the shortcut passed"));
        assert!(
            matches!(err, CoreError::Integrity { .. }),
            "{tamper:?} at the shortcut: not an integrity error: {err}"
        );
        assert_eq!(stats.failures, 1, "{tamper:?}");
    }
}

#[test]
fn honest_runs_raise_no_alarm() {
    let mut checks = 0;
    let mut worst: f64 = 0.0;
    let mut thresholds = [0f64; 3];
    for name in ["vgg11", "resnet18"] {
        for policy in ["schedule", "asym1", "fixed:2"] {
            // (svd: the light SVD, and the block SVD, whose X_U goes into its frame checked slab by slab.)
            for (shared, svd) in [(false, None), (true, None), (false, Some(block_svd()))] {
                for (threads, nsr) in [(1, 0.0), (2, 0.1)] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let cfg = SplitConfig {
                        svd,
                        ..cfg(policy, shared, nsr)
                    };
                    let (res, all) = pool.install(|| run_all_stats(name, cfg, Tamper::None, 0, 7));
                    res.unwrap_or_else(|e| {
                        panic!("{name} {policy} shared {shared} {svd:?} threads {threads}: {e}")
                    });
                    // Without noise, the block SVD's X_U goes into its frame (every conv's; a ResNet
                    // downsampling block's first conv keeps the pixels its 1 × 1 shortcut reads for that
                    // conv's check).
                    let in_frame = svd.is_some() && nsr == 0.0;
                    assert_eq!(
                        all.in_frame_forwards > 0,
                        in_frame,
                        "{name} {policy} {svd:?}"
                    );
                    let stats = all.integrity;
                    assert_eq!(stats.failures, 0);
                    checks += stats.checks;
                    worst = worst.max(stats.worst_ratio);
                    for (t, s) in thresholds.iter_mut().zip(stats.threshold_rel) {
                        *t = t.max(s);
                    }
                }
            }
        }
    }
    eprintln!(
        "honest: {checks} checks, no alarm; worst |difference|/tolerance {worst:.3e}; largest threshold \
         relative to RMS: Y_U {:.3e}, ∇X {:.3e}, ∇W_U {:.3e}",
        thresholds[0], thresholds[1], thresholds[2]
    );
    assert!(checks >= 10_000, "only {checks} checks");
    assert!(worst < 1.0);
}

#[test]
fn micro_batched_forwards_are_checked_part_by_part() {
    // Each part of a pipelined forward is its own check, and the ∇W_U check of the backward uses the
    // projection assembled from every part's: a lie in any of them is caught, and honest runs pass.
    let micro = |policy| SplitConfig {
        micro_batches: 3,
        ..cfg(policy, false, 0.0)
    };
    for name in ["vgg11", "resnet18"] {
        for policy in ["schedule", "asym1"] {
            let (res, all) = run_all_stats(name, micro(policy), Tamper::None, 0, 3);
            res.unwrap_or_else(|e| panic!("{name} {policy}: {e}"));
            let stats = all.integrity;
            assert_eq!(stats.failures, 0);
            assert!(stats.checks > 0);
            assert!(stats.worst_ratio < 1.0);
            // The last, inference, forward streams its parts through a VGG (a ResNet's convs run in its
            // blocks, conv by conv).
            assert_eq!(all.streamed_forwards, u64::from(name == "vgg11"), "{name}");
        }
        // A lie in a streamed inference forward (no training step before it) is caught too.
        for layer in [0, 3, 7] {
            let (res, all) = run_all_stats(name, micro("schedule"), Tamper::Output(0.1), layer, 0);
            let err = res.expect_err(&format!("{name}: a lie at conv {layer} passed"));
            assert!(
                matches!(err, CoreError::Integrity { .. }),
                "{name}: conv {layer}: {err}"
            );
            assert_eq!(all.integrity.failures, 1);
            assert_eq!(all.streamed_forwards, u64::from(name == "vgg11"), "{name}");
        }
        for (layer, tamper) in [
            (0, Tamper::Output(0.1)),
            (3, Tamper::Output(0.1)),
            (3, Tamper::InputGrad(0.1)),
            (3, Tamper::WeightGrad(0.1)),
            (0, Tamper::WeightGrad(0.1)),
        ] {
            let (res, stats) = run(name, micro("schedule"), tamper, layer, 2);
            let err = res.expect_err(&format!("{name}: {tamper:?} at conv {layer} passed"));
            assert!(
                matches!(err, CoreError::Integrity { .. }),
                "{name}: {tamper:?} at conv {layer}: {err}"
            );
            assert_eq!(stats.failures, 1);
        }
    }
}

#[test]
fn checks_off_believe_the_accelerator() {
    // The control: without checks the same lie goes unnoticed (which is why they are on by default).
    let cfg = SplitConfig {
        integrity: false,
        ..cfg("schedule", false, 0.0)
    };
    let (res, stats) = run("vgg11", cfg, Tamper::Output(1.0), 3, 1);
    assert!(res.is_ok());
    assert_eq!(stats.checks, 0);
}

#[test]
fn a_non_finite_result_is_named_with_checks_on_and_off() {
    // With checks on, Y_U's and ∇X's values are not scanned before the check: its sums turn non-finite,
    // and the failure is then reported as the bad value it is, as the scan would have.
    for integrity in [true, false] {
        for tamper in [
            Tamper::Output(f32::NAN),
            Tamper::Output(f32::INFINITY),
            Tamper::InputGrad(f32::NAN),
            Tamper::InputGrad(f32::NEG_INFINITY),
        ] {
            let cfg = SplitConfig {
                integrity,
                ..cfg("schedule", false, 0.0)
            };
            let (res, _) = run("vgg11", cfg, tamper, 3, 1);
            let err = res.expect_err(&format!("{tamper:?} (checks {integrity}) passed"));
            let mut msg = err.to_string();
            let mut src = std::error::Error::source(&err);
            while let Some(e) = src {
                msg = format!("{msg}: {e}");
                src = e.source();
            }
            assert!(
                msg.contains("non-finite") && msg.contains("conv"),
                "{tamper:?} (checks {integrity}): {msg}"
            );
            assert!(!matches!(err, CoreError::Integrity { .. }), "{msg}");
        }
    }
}

/// The accelerator's side of a connection, lying once: the first `ConvOutput` of conv 2 has one element
/// moved by the tensor's RMS.
fn lying_accelerator<T: Transport>(inner: T) -> SendHook<T, impl FnMut(&mut Vec<u8>)> {
    let mut done = false;
    SendHook {
        inner,
        hook: move |frame: &mut Vec<u8>| {
            if done {
                return;
            }
            if let Ok(Reply::ConvOutput { layer: 2, y_u }) = decode_reply(frame, MAX_MESSAGE) {
                done = true;
                let lie = Reply::ConvOutput {
                    layer: 2,
                    y_u: accelerator_result(&moved(&y_u, 1.0)),
                };
                encode_reply(&lie, MAX_MESSAGE, frame).unwrap();
            }
        },
    }
}

#[test]
fn train_stops_with_exit_code_3_and_keeps_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    // The paper's schedule: under the default guard every conv of this 28 px model stays trusted.
    let common = [
        "train",
        "--rank",
        "schedule",
        "--limit-train",
        "128",
        "--batch-size",
        "32",
        "--threads",
        "2",
        "--json",
    ];
    let mut first = common.to_vec();
    first.extend(["--epochs", "1", "--out", run_dir.to_str().unwrap()]);
    let out = asymml(&first);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(line["integrity"]["checks"].as_u64().unwrap() > 0, "{text}");
    assert_eq!(line["integrity"]["failures"], 0);
    let checkpoint = run_dir.join("checkpoint.safetensors");
    let before = std::fs::read(&checkpoint).unwrap();

    // A modified accelerator over TCP, resumed against.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let t = asymml_protocol::TcpTransport::from_stream(
            stream,
            &asymml_protocol::TransportOptions::default(),
        )
        .unwrap();
        let _ = Service::new(1).unwrap().serve(lying_accelerator(t));
    });
    let url = format!("tcp://{addr}");
    let out = asymml(&[
        "train",
        "--resume",
        run_dir.to_str().unwrap(),
        "--rank",
        "schedule",
        "--epochs",
        "2",
        "--json",
        "--accelerator",
        &url,
        "--insecure-plaintext-tcp",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("integrity check failed at conv"), "{err}");
    assert!(err.contains("Y_U"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let text = String::from_utf8_lossy(&out.stdout);
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(line["integrity"]["failures"], 1, "{text}");
    assert!(
        line["error"].as_str().unwrap().contains("integrity"),
        "{text}"
    );
    assert_eq!(
        std::fs::read(&checkpoint).unwrap(),
        before,
        "the checkpoint changed"
    );
    let _ = server.join();
}

/// An executor wrapping the split runtime that forwards the convs but not the end of the backward.
struct Forgetful<'a, E: ConvExec>(&'a mut E);

impl<E: ConvExec> ConvExec for Forgetful<'_, E> {
    fn conv_forward(
        &mut self,
        conv: &mut asymml_core::layers::Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        train: bool,
    ) -> asymml_core::Result<()> {
        self.0.conv_forward(conv, x, y, train)
    }
    fn conv_backward(
        &mut self,
        conv: &mut asymml_core::layers::Conv2d,
        x: &Tensor,
        dy: &Tensor,
        dx: Option<&mut Tensor>,
    ) -> asymml_core::Result<()> {
        self.0.conv_backward(conv, x, dy, dx)
    }
}

#[test]
fn a_pipelined_backward_that_is_not_ended_is_an_error_not_a_lost_gradient() {
    let (mut net, x, labels) = model("vgg11");
    let (client, server) = inproc_pair();
    let service = std::thread::spawn(move || Service::new(1).unwrap().serve(server));
    let mut exec = SplitExec::connect(client, &mut net, cfg("schedule", false, 0.0)).unwrap();
    net.zero_grad();
    net.forward_loss(&x, &labels, true, &mut exec).unwrap();
    // The wrapper does not pass the backward's end on: a ∇W_U is still due, and a conv's ∇W held.
    net.backward(&mut Forgetful(&mut exec), false).unwrap();
    let e = net.forward(&x, false, &mut exec).unwrap_err();
    assert!(e.to_string().contains("was not ended"), "{e}");
    // Ended, the step goes on: every conv has its ∇W back.
    exec.backward_end(&mut net).unwrap();
    for c in net.convs_mut() {
        assert_eq!(c.weight.grad.len(), c.weight.value.len(), "conv {}", c.id);
        assert!(
            c.weight.grad.data.iter().any(|&g| g != 0.0),
            "conv {}",
            c.id
        );
    }
    net.forward(&x, false, &mut exec).unwrap();
    exec.shutdown().unwrap();
    service.join().unwrap().unwrap();
}

#[test]
fn a_lean_training_forward_equals_trusted_only_and_is_checked() {
    // With V never held for the whole batch (every split conv's V made again from X for the slabs of X_U and
    // for Conv_T), a training step gives trusted-only's loss and gradients, and lies are still caught.
    LEAN_V.with(|l| l.set(Some(0)));
    for name in ["vgg11", "resnet18"] {
        for policy in ["schedule", "asym1"] {
            let cfg = SplitConfig {
                svd: Some(block_svd()),
                ..cfg(policy, false, 0.0)
            };
            // One step each way from the same weights.
            let (mut net, x, labels) = model(name);
            let (mut reference, _, _) = model(name);
            let (client, server) = inproc_pair();
            let service = std::thread::spawn(move || Service::new(1).unwrap().serve(server));
            let mut exec = SplitExec::connect(client, &mut net, cfg.clone()).unwrap();
            exec.set_lean_v_bytes(0);
            let stats = exec.stats();
            let (loss, _) = net.forward_loss(&x, &labels, true, &mut exec).unwrap();
            net.backward(&mut exec, false).unwrap();
            exec.shutdown().unwrap();
            service.join().unwrap().unwrap();
            let (ref_loss, _) = reference
                .forward_loss(&x, &labels, true, &mut LocalExec)
                .unwrap();
            reference.backward(&mut LocalExec, false).unwrap();
            let all = stats.lock().unwrap().clone();
            assert!(all.lean_forwards > 0, "{name} {policy}: no lean forward");
            assert_eq!(all.integrity.failures, 0);
            assert!((loss - ref_loss).abs() <= 1e-4 * ref_loss.abs().max(1.0));
            let mut grads = Vec::new();
            reference.visit_params(&mut |n, p| grads.push((n.to_string(), p.grad.data.clone())));
            // (Against the largest gradient of the network: a conv's bias ahead of BatchNorm has a gradient of
            // round-off only.)
            let scale = grads
                .iter()
                .flat_map(|(_, g)| g.iter())
                .fold(0f32, |m, v| m.max(v.abs()));
            let mut i = 0;
            net.visit_params(&mut |n, p| {
                let (rn, rg) = &grads[i];
                assert_eq!(n, rn);
                let err = p
                    .grad
                    .data
                    .iter()
                    .zip(rg)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(err <= 1e-4 * scale, "{name} {policy} {n}: {err} of {scale}");
                i += 1;
            });
            // A lie in Y_U or in ∇W_U of a lean conv is caught (conv 3 splits with the schedule's small ranks;
            // asym1 keeps every channel of some of these small maps).
            let lies: &[Tamper] = if policy == "schedule" {
                &[Tamper::Output(0.1), Tamper::WeightGrad(0.1)]
            } else {
                &[]
            };
            for &tamper in lies {
                let (res, stats) = run(name, cfg.clone(), tamper, 3, 2);
                let err = res.expect_err(&format!("{name} {policy}: {tamper:?} passed"));
                assert!(matches!(err, CoreError::Integrity { .. }), "{err}");
                assert_eq!(stats.failures, 1);
            }
            let (res, all) = run_all_stats(name, cfg, Tamper::None, 0, 2);
            res.unwrap();
            assert!(all.lean_forwards > 0 && all.integrity.failures == 0);
        }
    }
    LEAN_V.with(|l| l.set(None));
}

#[test]
fn a_shared_basis_goes_into_its_frame_checked_and_a_lie_is_caught() {
    // The batch-shared basis's X_U is made slab by slab from its factors straight into the frame, as the
    // per-sample basis's: honest steps raise no alarm, and a lie at a shared-basis conv is caught.
    for name in ["vgg11", "resnet18"] {
        for policy in ["schedule", "asym2"] {
            let cfg = SplitConfig {
                svd: Some(block_svd()),
                ..cfg(policy, true, 0.0)
            };
            let (res, all) = run_all_stats(name, cfg.clone(), Tamper::None, 0, 2);
            res.unwrap_or_else(|e| panic!("{name} {policy}: {e}"));
            assert!(all.in_frame_forwards > 0, "{name} {policy}");
            assert!(all.layers.iter().any(|l| l.shared_basis), "{name} {policy}");
            assert_eq!(all.integrity.failures, 0);
            for tamper in [
                Tamper::Output(0.1),
                Tamper::InputGrad(0.1),
                Tamper::WeightGrad(0.1),
            ] {
                let (res, stats) = run(name, cfg.clone(), tamper, 3, 2);
                let err = res.expect_err(&format!("{name} {policy}: {tamper:?} passed"));
                assert!(matches!(err, CoreError::Integrity { .. }), "{err}");
                assert_eq!(stats.failures, 1);
            }
        }
    }
}

#[test]
fn basis_auto_tries_the_shared_basis_and_every_step_equals_trusted_only() {
    // `Basis::Auto` under an energy policy: the per-sample basis on the first three steps, the shared one on
    // the next three (whatever they cost), then the cheaper; every forward equals trusted-only's. Under a
    // fixed rank (at which a shared basis keeps less of each sample) it never takes the shared basis.
    for name in ["vgg11", "resnet18"] {
        for (policy, tries) in [("asym2", true), ("schedule", false)] {
            let (mut net, x, _) = model(name);
            let (mut reference, _, _) = model(name);
            let want = reference.forward(&x, false, &mut LocalExec).unwrap();
            let cfg = SplitConfig {
                svd: Some(block_svd()),
                basis: Basis::Auto,
                ..cfg(policy, false, 0.0)
            };
            let (client, server) = inproc_pair();
            let service = std::thread::spawn(move || Service::new(1).unwrap().serve(server));
            let mut exec = SplitExec::connect(client, &mut net, cfg).unwrap();
            let stats = exec.stats();
            for step in 0..8 {
                let y = net.forward(&x, false, &mut exec).unwrap();
                let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
                let err = y
                    .data
                    .iter()
                    .zip(&want.data)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(err <= 1e-4 * scale, "{name} {policy} step {step}: {err}");
                let all = stats.lock().unwrap().clone();
                let shared = all.layers.iter().any(|l| l.shared_basis);
                let split = all.layers.iter().any(|l| !l.trusted_route);
                assert!(split, "{name} {policy}: nothing split");
                match step {
                    0..=2 => assert!(!shared, "{name} {policy} step {step}"),
                    3..=5 => assert_eq!(shared, tries, "{name} {policy} step {step}"),
                    _ => assert!(tries || !shared, "{name} {policy} step {step}"),
                }
                assert_eq!(all.integrity.failures, 0);
            }
            exec.shutdown().unwrap();
            service.join().unwrap().unwrap();
        }
    }
}

#[test]
fn batchnorm_in_the_merge_equals_trusted_only_and_a_lie_there_is_caught() {
    // VGG11 at 32 px: convs 2, 4 and 6 have a BatchNorm with no pooling after it; ResNet18 (CIFAR style): the
    // stem and both convs of every block. In inference the split runtime applies that BatchNorm in the pass
    // that checks Y_U and adds it to Y_T (with the light SVD's X_U through a scratch tensor, and the block
    // SVD's into its frame): the logits equal trusted-only's, and a lie in Y_U at such a conv is caught there.
    use asymml_core::models::Layer;
    for (name, mapped) in [("vgg11", 3), ("resnet18", 17)] {
        for svd in [None, Some(block_svd())] {
            let cfg = SplitConfig {
                svd,
                ..cfg("fixed:2", false, 0.0)
            };
            let (mut net, x, _) = model(name);
            let mut rng = Rng::new(21);
            let mut bns = Vec::new();
            for node in &mut net.nodes {
                match &mut node.layer {
                    Layer::BatchNorm(b) => bns.push(b),
                    Layer::Block(blk) => {
                        bns.push(&mut blk.bn1);
                        bns.push(&mut blk.bn2);
                    }
                    _ => {}
                }
            }
            for b in bns {
                for v in b.weight.value.data.iter_mut() {
                    *v = rng.normal();
                }
                for v in b.bias.value.data.iter_mut() {
                    *v = 0.5 * rng.normal();
                }
                for v in b.running_mean.data.iter_mut() {
                    *v = 0.3 * rng.normal();
                }
                for v in b.running_var.data.iter_mut() {
                    *v = 0.5 + rng.uniform();
                }
            }
            let want = net.forward(&x, false, &mut LocalExec).unwrap().clone();
            let (client, server) = inproc_pair();
            let service = std::thread::spawn(move || Service::new(1).unwrap().serve(server));
            let mut exec = SplitExec::connect(client, &mut net, cfg.clone()).unwrap();
            let stats = exec.stats();
            for round in 1..=2u64 {
                let got = net.forward(&x, false, &mut exec).unwrap();
                let scale = want.data.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                for (a, b) in got.data.iter().zip(&want.data) {
                    assert!((a - b).abs() <= 1e-4 * scale, "{name} {svd:?}: {a} vs {b}");
                }
                let n = stats.lock().unwrap().mapped_forwards;
                assert_eq!(n, mapped * round, "{name} {svd:?}");
            }
            exec.shutdown().unwrap();
            service.join().unwrap().unwrap();
            for layer in [2u32, 4] {
                let (res, all) = run_all_stats(name, cfg.clone(), Tamper::Output(0.1), layer, 0);
                let err =
                    res.expect_err(&format!("{name}: a lie at conv {layer} passed ({svd:?})"));
                assert!(
                    matches!(err, CoreError::Integrity { .. }),
                    "{name} conv {layer}: not an integrity error: {err}"
                );
                assert_eq!(all.integrity.failures, 1);
                assert!(all.mapped_forwards < mapped, "{name} conv {layer}");
            }
        }
    }
}
