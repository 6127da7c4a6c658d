//! Linear's small-batch kernels (batch ≤ 8: one pass over W and ∇W) against f64 loops and against the
//! GEMM path (a batch of 9 whose extra row has a zero gradient).

use asymml_core::layers::Linear;
use asymml_core::rng::Rng;
use asymml_core::Tensor;

fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(shape, (0..n).map(|_| rng.normal()).collect()).unwrap()
}

fn close(a: &[f32], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (j, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x as f64 - y).abs() <= 1e-5 * (1.0 + y.abs()) * 4.0,
            "{what}[{j}]: {x} vs {y}"
        );
    }
}

/// Forward, then backward twice (∇W and ∇b accumulate) with and without ∇x, against f64 loops.
fn case(rng: &mut Rng, b: usize, i: usize, o: usize) {
    let mut lin = Linear::new(i, o, rng);
    let x = randn(rng, &[b, i]);
    let dy = randn(rng, &[b, o]);
    let what = format!("b {b} i {i} o {o}");
    let mut y = Tensor::default();
    lin.forward(&x, &mut y).unwrap();
    assert_eq!(y.shape, [b, o]);
    let (w, bias) = (&lin.weight.value.data, &lin.bias.value.data);
    let y_ref: Vec<f64> = (0..b * o)
        .map(|k| {
            let (bb, oo) = (k / o, k % o);
            bias[oo] as f64
                + (0..i)
                    .map(|j| x.data[bb * i + j] as f64 * w[oo * i + j] as f64)
                    .sum::<f64>()
        })
        .collect();
    close(&y.data, &y_ref, &format!("{what}: y"));
    let dx_ref: Vec<f64> = (0..b * i)
        .map(|k| {
            let (bb, j) = (k / i, k % i);
            (0..o)
                .map(|oo| dy.data[bb * o + oo] as f64 * w[oo * i + j] as f64)
                .sum::<f64>()
        })
        .collect();
    let dw_ref: Vec<f64> = (0..o * i)
        .map(|k| {
            let (oo, j) = (k / i, k % i);
            2.0 * (0..b)
                .map(|bb| dy.data[bb * o + oo] as f64 * x.data[bb * i + j] as f64)
                .sum::<f64>()
        })
        .collect();
    let db_ref: Vec<f64> = (0..o)
        .map(|oo| 2.0 * (0..b).map(|bb| dy.data[bb * o + oo] as f64).sum::<f64>())
        .collect();
    let mut dx = Tensor::default();
    lin.backward(&x, &dy, Some(&mut dx)).unwrap();
    close(&dx.data, &dx_ref, &format!("{what}: ∇x"));
    lin.backward(&x, &dy, None).unwrap();
    close(&lin.weight.grad.data, &dw_ref, &format!("{what}: ∇W"));
    close(&lin.bias.grad.data, &db_ref, &format!("{what}: ∇b"));
}

#[test]
fn small_batches_match_f64_loops() {
    let mut rng = Rng::new(21);
    for b in [1, 2, 3, 7, 8] {
        // in_f: below one 8-lane step, a tail, and more than one block of inputs; out_f: not a multiple of
        // the rows per task.
        // (8300: more than one block of the x86 kernels; 37 and 38 leave one and two rows past the backward
        // kernel's groups of four.)
        for (i, o) in [(5, 3), (37, 19), (1100, 37), (1100, 38), (8300, 5)] {
            case(&mut rng, b, i, o);
        }
    }
    // The GEMM path (batch above 8) against the same loops.
    case(&mut rng, 9, 300, 21);
}

#[test]
fn small_batch_equals_the_gemm_path() {
    let mut rng = Rng::new(4);
    let (b, i, o) = (8, 777, 45);
    let mut small = Linear::new(i, o, &mut rng);
    let mut big = Linear::new(i, o, &mut rng);
    big.weight.value = small.weight.value.clone();
    big.bias.value = small.bias.value.clone();
    let x = randn(&mut rng, &[b, i]);
    let dy = randn(&mut rng, &[b, o]);
    // Batch 9: the extra row of x is random, its gradient zero.
    let mut x9 = x.clone();
    x9.shape[0] = 9;
    x9.data.extend((0..i).map(|_| rng.normal()));
    let mut dy9 = dy.clone();
    dy9.shape[0] = 9;
    dy9.data.extend(std::iter::repeat_n(0.0, o));
    let (mut y, mut y9, mut dx, mut dx9) = (
        Tensor::default(),
        Tensor::default(),
        Tensor::default(),
        Tensor::default(),
    );
    small.forward(&x, &mut y).unwrap();
    big.forward(&x9, &mut y9).unwrap();
    let as64 = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
    close(&y.data, &as64(&y9.data[..b * o]), "y");
    small.backward(&x, &dy, Some(&mut dx)).unwrap();
    big.backward(&x9, &dy9, Some(&mut dx9)).unwrap();
    close(&dx.data, &as64(&dx9.data[..b * i]), "∇x");
    close(&small.weight.grad.data, &as64(&big.weight.grad.data), "∇W");
    close(&small.bias.grad.data, &as64(&big.bias.grad.data), "∇b");
}
