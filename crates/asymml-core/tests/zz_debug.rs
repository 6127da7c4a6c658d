mod common;
use asymml_core::models::{LocalExec, ModelSpec};
use asymml_core::rng::Rng;
use common::{dot, randn};

#[test]
fn dbg() {
    for (name, chans, input, train) in [("vgg-small", 1, 8, false), ("resnet18-cifar", 3, 16, true)]
    {
        let mut spec = ModelSpec::parse(name, chans, 4, input).unwrap();
        if name.starts_with("resnet") {
            spec.width = 2;
        }
        let mut net = spec.build(4).unwrap();
        let x = randn(&mut Rng::new(15), &[2, chans, input, input], 1.0);
        let y = net.forward(&x, train, &mut LocalExec).unwrap().clone();
        let r = randn(&mut Rng::new(1), &y.shape, 1.0);
        net.zero_grad();
        net.backward_from(r.clone(), &mut LocalExec, true).unwrap();
        let mut g = vec![];
        net.visit_params(&mut |n, p| {
            if g.is_empty() {
                g = p.grad.data.clone();
                eprintln!("{n}")
            }
        });
        for i in [0usize, 5, 9, 11, 15, 20] {
            let mut line = format!("{name} [{i}] analytic {:.5}:", g[i]);
            for eps in [3e-2f32, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4] {
                let mut l = |d: f32| {
                    let mut k = 0;
                    net.visit_params(&mut |_, p| {
                        if k == 0 {
                            p.value.data[i] += d;
                        }
                        k += 1;
                    });
                    let v = dot(&net.forward(&x, train, &mut LocalExec).unwrap().clone(), &r);
                    let mut k = 0;
                    net.visit_params(&mut |_, p| {
                        if k == 0 {
                            p.value.data[i] -= d;
                        }
                        k += 1;
                    });
                    v
                };
                let n = (l(eps) - l(-eps)) / (2.0 * eps as f64);
                line += &format!(" {eps:e}:{n:.5}");
            }
            eprintln!("{line}");
        }
    }
}
