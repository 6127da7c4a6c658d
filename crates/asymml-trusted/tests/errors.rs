//! An accelerator's refusal reaches the user as one chain that names the conv, the request and the
//! accelerator's own words, each once.

use asymml_core::decomp::RankPolicy;
use asymml_core::models::ModelSpec;
use asymml_core::rng::Rng;
use asymml_core::{error_chain, CoreError, Tensor};
use asymml_protocol::{inproc_pair, serve, Reply, Request};
use asymml_trusted::split::{Basis, SplitConfig, SplitExec};

#[test]
fn a_refused_conv_is_named_once_with_its_cause() {
    let (ours, theirs) = inproc_pair();
    // An accelerator that accepts the registration and the weights and refuses every conv.
    let server = std::thread::spawn(move || {
        serve(theirs, &mut |req| match req {
            Request::Register { .. } | Request::SetWeights { .. } | Request::Shutdown => Reply::Ok,
            _ => Reply::error("out of memory for this layer"),
        })
    });
    let spec = ModelSpec::parse("vgg-small", 1, 10, 28).unwrap();
    let mut net = spec.build(0).unwrap();
    let cfg = SplitConfig {
        policy: RankPolicy::Schedule,
        iters: 1,
        nsr: 0.0,
        seed: 0,
        basis: Basis::PerSample,
        ..Default::default()
    };
    let mut exec = SplitExec::connect(ours, &mut net, cfg).unwrap();
    let mut rng = Rng::new(1);
    let x = Tensor {
        shape: vec![2, 1, 28, 28],
        data: (0..2 * 28 * 28).map(|_| rng.normal()).collect(),
    };
    // The first conv has one input channel: rank 1 keeps all of it, so it runs wholly in the trusted runtime
    // and the first request the accelerator refuses is the second conv's.
    let err = net.forward(&x, true, &mut exec).unwrap_err();
    let text = error_chain(&err);
    assert_eq!(text.matches("ConvForward(layer 1)").count(), 1, "{text}");
    assert_eq!(text.matches("out of memory").count(), 1, "{text}");
    assert!(text.contains("conv features.4"), "{text}");
    // The layer and the cause are structured, not only text.
    match &err {
        CoreError::Accelerator {
            conv: Some(c),
            source,
        } => {
            assert_eq!(c, "features.4");
            assert!(
                source.to_string().contains("ConvForward(layer 1)"),
                "{text}"
            );
        }
        other => panic!("not a structured accelerator error: {other:?}"),
    }
    drop(exec);
    let _ = server.join();
}
