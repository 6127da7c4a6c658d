//! Declassification and the validating way back.

use asymml_core::Tensor;
use asymml_protocol::*;

fn wire(shape: &[usize], data: Vec<f32>) -> WireTensor {
    declassify_residual(&Tensor {
        shape: shape.to_vec(),
        data,
    })
}

#[test]
fn every_declassification_copies_shape_and_values() {
    let x = Tensor::from_vec(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    for w in [
        declassify_residual(&x),
        declassify_output_grad(&x),
        declassify_updated_weights(&x),
        public_weights(&x),
        accelerator_result(&x),
    ] {
        assert_eq!(w.shape(), &[2, 3]);
        assert_eq!(w.data(), x.data.as_slice());
        assert_eq!(w.len(), 6);
        assert_eq!(w.payload_bytes(), 24);
        assert_eq!(w.into_tensor_checked(&[2, 3]).unwrap(), x);
    }
}

#[test]
fn into_tensor_checked_refuses_a_wrong_shape() {
    let w = wire(&[2, 3], vec![0.0; 6]);
    let e = w.clone().into_tensor_checked(&[3, 2]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid tensor: wrong shape: expected [3, 2], got [2, 3]"
    );
    let e = w.into_tensor_checked(&[2, 3, 1]).unwrap_err();
    assert!(e.to_string().contains("wrong shape"), "{e}");
}

#[test]
fn into_tensor_checked_refuses_a_wrong_length() {
    let e = wire(&[2, 3], vec![0.0; 5])
        .into_tensor_checked(&[2, 3])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid tensor: wrong length: shape [2, 3] needs 6 values, got 5"
    );
}

#[test]
fn into_tensor_checked_refuses_nan_and_inf() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut data = vec![0.5; 3000];
        data[2500] = bad;
        let e = wire(&[3000], data)
            .into_tensor_checked(&[3000])
            .unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("non-finite value") && s.contains("at index 2500"),
            "{s}"
        );
    }
    // Extreme finite values pass.
    let t = wire(&[3], vec![f32::MAX, f32::MIN_POSITIVE, -0.0])
        .into_tensor_checked(&[3])
        .unwrap();
    assert_eq!(t.data[0], f32::MAX);
}

#[test]
fn into_tensor_matching_accepts_wildcards() {
    let w = wire(&[5, 64, 8, 8], vec![1.0; 5 * 64 * 64]);
    let t = w
        .clone()
        .into_tensor_matching(&[None, Some(64), None, None])
        .unwrap();
    assert_eq!(t.shape, [5, 64, 8, 8]);
    let e = w
        .clone()
        .into_tensor_matching(&[None, Some(32), None, None])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid tensor: wrong shape: expected [_, 32, _, _], got [5, 64, 8, 8]"
    );
    assert!(w.into_tensor_matching(&[None, None]).is_err());
    let e = wire(&[2], vec![1.0, f32::NAN])
        .into_tensor_matching(&[None])
        .unwrap_err();
    assert!(e.to_string().contains("non-finite"), "{e}");
}

#[test]
fn copy_into_checked_reuses_the_output() {
    let mut out = Tensor::zeros(&[100]);
    let cap = out.data.capacity();
    wire(&[2, 5], (0..10).map(|i| i as f32).collect())
        .copy_into_checked(&[2, 5], &mut out)
        .unwrap();
    assert_eq!(out.shape, [2, 5]);
    assert_eq!(out.data[9], 9.0);
    assert_eq!(out.data.capacity(), cap);
    assert!(wire(&[2], vec![f32::INFINITY, 0.0])
        .copy_into_checked(&[2], &mut out)
        .is_err());
    assert!(wire(&[2], vec![0.0, 0.0])
        .copy_into_checked(&[1, 2], &mut out)
        .is_err());
}

#[test]
fn debug_output_is_short() {
    let s = format!("{:?}", wire(&[1000], vec![1.5; 1000]));
    assert!(s.len() < 120, "{s}");
    assert!(s.contains("[1000]") && s.contains("1000 values"), "{s}");
}

#[test]
fn into_sum_checked_finds_non_finite_values_in_its_own_pass() {
    let addend = Tensor::from_vec(&[3, 7], vec![0.5; 21]).unwrap();
    let out = wire(&[3, 7], (0..21).map(|i| i as f32).collect())
        .into_sum_checked(&[3, 7], &addend)
        .unwrap();
    assert_eq!(out.shape, vec![3, 7]);
    assert_eq!(out.data[20], 20.5);
    for (i, bad) in [(0, f32::NAN), (13, f32::INFINITY), (20, f32::NEG_INFINITY)] {
        let mut v = vec![1.0; 21];
        v[i] = bad;
        let e = wire(&[3, 7], v)
            .into_sum_checked(&[3, 7], &addend)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("non-finite value {bad} at index {i}")),
            "{e}"
        );
    }
    // Past the first block of the pass: the index is the tensor's.
    let mut v = vec![1.0; 10_000];
    v[9_001] = f32::NAN;
    let e = wire(&[10_000], v)
        .into_sum_checked(&[10_000], &Tensor::zeros(&[10_000]))
        .unwrap_err();
    assert!(e.to_string().contains("at index 9001"), "{e}");
    // Finite values whose sum leaves float32's range.
    let big = Tensor::from_vec(&[2], vec![f32::MAX, 0.0]).unwrap();
    let e = wire(&[2], vec![f32::MAX, 1.0])
        .into_sum_checked(&[2], &big)
        .unwrap_err();
    assert!(e.to_string().contains("beyond float32"), "{e}");
    // A wrong shape on either side.
    assert!(wire(&[2], vec![1.0, 2.0])
        .into_sum_checked(&[1, 2], &big)
        .is_err());
}

#[test]
fn unscanned_data_checks_the_shape_and_length_only() {
    let w = wire(&[2], vec![1.0, f32::NAN]);
    assert_eq!(w.shaped_data_unscanned(&[2]).unwrap().len(), 2);
    assert!(w.shaped_data_unscanned(&[1, 2]).is_err());
    assert!(w.checked_data(&[2]).is_err());
    assert!(w.into_tensor_unscanned(&[2]).unwrap().data[1].is_nan());
}
