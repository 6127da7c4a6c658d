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

/// A `ConvOutput` frame for `layer` holding `y`.
fn conv_output_frame(layer: u32, y: WireTensor) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_reply(&Reply::ConvOutput { layer, y_u: y }, MAX_MESSAGE, &mut buf).unwrap();
    buf
}

#[test]
fn a_conv_output_is_read_in_its_frame_and_added_with_the_same_checks() {
    let frame = conv_output_frame(
        7,
        accelerator_result(
            &Tensor::from_vec(&[3, 7], (0..21).map(|i| i as f32).collect()).unwrap(),
        ),
    );
    let (layer, y_u) = decode_conv_output_view(&frame, MAX_MESSAGE)
        .unwrap()
        .unwrap();
    assert_eq!((layer, y_u.shape()), (7, &[3usize, 7][..]));
    assert_eq!(y_u.words_unscanned(&[3, 7]).unwrap().len(), 21);
    assert!(y_u.words_unscanned(&[21]).is_err());
    let mut out = Tensor::from_vec(&[3, 7], vec![0.5; 21]).unwrap();
    y_u.add_into_checked(&[3, 7], &mut out).unwrap();
    assert_eq!(out.data[20], 20.5);
    assert_eq!(y_u.first_non_finite(), None);
    // The same refusals as `into_sum_checked`, naming the received value.
    for (i, bad) in [(0, f32::NAN), (13, f32::INFINITY), (20, f32::NEG_INFINITY)] {
        let mut v = vec![1.0; 21];
        v[i] = bad;
        let frame = conv_output_frame(
            7,
            accelerator_result(&Tensor::from_vec(&[3, 7], v).unwrap()),
        );
        let (_, y_u) = decode_conv_output_view(&frame, MAX_MESSAGE)
            .unwrap()
            .unwrap();
        assert_eq!(y_u.first_non_finite().map(|(j, _)| j), Some(i));
        let mut out = Tensor::from_vec(&[3, 7], vec![0.5; 21]).unwrap();
        let e = y_u.add_into_checked(&[3, 7], &mut out).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("non-finite value {bad} at index {i}")),
            "{e}"
        );
    }
    let frame = conv_output_frame(
        1,
        accelerator_result(&Tensor::from_vec(&[2], vec![f32::MAX, 1.0]).unwrap()),
    );
    let (_, y_u) = decode_conv_output_view(&frame, MAX_MESSAGE)
        .unwrap()
        .unwrap();
    let mut big = Tensor::from_vec(&[2], vec![f32::MAX, 0.0]).unwrap();
    let e = y_u.add_into_checked(&[2], &mut big).unwrap_err();
    assert!(e.to_string().contains("beyond float32"), "{e}");
    // The destination's shape is checked too.
    let mut wrong = Tensor::zeros(&[1, 2]);
    assert!(y_u.add_into_checked(&[2], &mut wrong).is_err());
    // Another reply is not a view; a malformed ConvOutput is the error the full decoder gives.
    let mut ok = Vec::new();
    encode_reply(&Reply::Ok, MAX_MESSAGE, &mut ok).unwrap();
    assert!(decode_conv_output_view(&ok, MAX_MESSAGE).unwrap().is_none());
    let mut cut = frame.clone();
    cut.pop();
    let len = (cut.len() - 4) as u32;
    cut[..4].copy_from_slice(&len.to_le_bytes());
    let (a, b) = (
        decode_conv_output_view(&cut, MAX_MESSAGE).err().unwrap(),
        decode_reply(&cut, MAX_MESSAGE).unwrap_err(),
    );
    assert_eq!(a.to_string(), b.to_string());
    let mut longer = frame.clone();
    longer.push(0);
    let len = (longer.len() - 4) as u32;
    longer[..4].copy_from_slice(&len.to_le_bytes());
    assert!(decode_conv_output_view(&longer, MAX_MESSAGE).is_err());
}

#[test]
fn the_client_receives_a_conv_output_in_place_and_refuses_any_other_reply() {
    let (a, b) = inproc_pair();
    let server = std::thread::spawn(move || {
        let mut n = 0;
        serve(b, &mut |req| {
            n += 1;
            match (n, req) {
                (2, Request::ConvForward { layer, x_u, .. }) => Reply::ConvOutput {
                    layer,
                    y_u: accelerator_result(
                        &Tensor::from_vec(x_u.shape(), x_u.data().to_vec()).unwrap(),
                    ),
                },
                (3, _) => Reply::ConvOutput {
                    layer: 9,
                    y_u: accelerator_result(&Tensor::zeros(&[1])),
                },
                (4, _) => Reply::error("out of memory"),
                _ => Reply::Ok,
            }
        })
    });
    let mut c = Client::connect(a).unwrap();
    c.call(&Request::Step { lr: 0.1 }).unwrap();
    let x = Tensor::from_vec(&[1, 2, 1, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
    let fwd = || Request::ConvForward {
        layer: 3,
        x_u: declassify_residual(&x),
        train: false,
    };
    c.send_request(&fwd()).unwrap();
    let frame = c.recv_conv_output(3).unwrap();
    let mut y = Tensor::zeros(&[1, 2, 1, 2]);
    frame.y_u().add_into_checked(&[1, 2, 1, 2], &mut y).unwrap();
    assert_eq!(y.data, x.data);
    c.reuse_frame(frame);
    // Another layer's output, then the accelerator's error: both refused, naming the request.
    c.send_request(&fwd()).unwrap();
    let e = c.recv_conv_output(3).err().unwrap();
    let (op, root) = (e.to_string(), e.root().to_string());
    assert!(
        op.contains("ConvForward(layer 3)") && root.contains("layer 9"),
        "{op}: {root}"
    );
    c.send_request(&fwd()).unwrap();
    let e = c.recv_conv_output(3).err().unwrap();
    assert!(e.root().to_string().contains("out of memory"), "{e}");
    assert!(c.recv_conv_output(3).is_err(), "nothing outstanding");
    c.send_request(&Request::Shutdown).unwrap();
    drop(c);
    let _ = server.join();
}

#[test]
fn the_client_receives_conv_grads_in_place_and_copies_them_into_kept_buffers() {
    let (a, b) = inproc_pair();
    let server = std::thread::spawn(move || {
        serve(b, &mut |req| match req {
            Request::ConvBackward { layer, dy, need_dx } => Reply::ConvGrads {
                layer,
                dx: need_dx.then(|| {
                    accelerator_result(
                        &Tensor::from_vec(dy.shape(), vec![f32::NAN; dy.len()]).unwrap(),
                    )
                }),
                dw: accelerator_result(&Tensor::from_vec(&[2, 1], vec![1.5, -2.0]).unwrap()),
            },
            Request::ConvInputGrad { layer, dy } => Reply::InputGrad {
                layer,
                dx: accelerator_result(
                    &Tensor::from_vec(dy.shape(), vec![0.25; dy.len()]).unwrap(),
                ),
            },
            Request::ConvWeightGrad { layer } => Reply::WeightGrad {
                layer,
                dw: accelerator_result(&Tensor::from_vec(&[2, 1], vec![3.0, 4.0]).unwrap()),
            },
            _ => Reply::Ok,
        })
    });
    let mut c = Client::connect(a).unwrap();
    let dy = Tensor::from_vec(&[1, 3], vec![1.0, 2.0, 3.0]).unwrap();
    for need_dx in [false, true] {
        c.send_request(&Request::ConvBackward {
            layer: 4,
            dy: declassify_output_grad(&dy),
            need_dx,
        })
        .unwrap();
        let frame = c.recv_grads(MessageKind::ConvGrads, 4).unwrap();
        assert_eq!(frame.payload_bytes(), if need_dx { 20 } else { 8 });
        let (dx, dw) = frame.grads().unwrap();
        let dw = dw.unwrap();
        let mut kept = Tensor::zeros(&[5]);
        dw.copy_into(&[2, 1], &mut kept, true).unwrap();
        assert_eq!(
            (kept.shape.as_slice(), kept.data.as_slice()),
            (&[2usize, 1][..], &[1.5f32, -2.0][..])
        );
        assert!(
            dw.copy_into(&[1, 2], &mut kept, true).is_err(),
            "the shape is checked"
        );
        assert_eq!(dx.is_some(), need_dx);
        if let Some(dx) = dx {
            let mut out = Tensor::default();
            // Unscanned: copied as they came (the caller's check fails on them); scanned: refused.
            dx.copy_into(&[1, 3], &mut out, false).unwrap();
            assert!(out.data.iter().all(|v| v.is_nan()));
            let e = dx.copy_into(&[1, 3], &mut out, true).unwrap_err();
            assert!(
                e.to_string().contains("non-finite value NaN at index 0"),
                "{e}"
            );
        }
        c.reuse_grads_frame(frame);
    }
    // The backward in two halves: ∇X alone (∇Y written in place), then ∇W_U alone.
    let mut frame = c.start_input_grad(4, &dy.shape).unwrap();
    declassify_output_grad_into(&mut frame, &dy).unwrap();
    c.send_frame_expecting(frame, 12).unwrap();
    c.send_request(&Request::ConvWeightGrad { layer: 4 })
        .unwrap();
    let frame = c.recv_grads(MessageKind::InputGrad, 4).unwrap();
    let (dx, dw) = frame.grads().unwrap();
    let mut out = Tensor::default();
    dx.unwrap().copy_into(&[1, 3], &mut out, true).unwrap();
    assert_eq!(out.data, [0.25; 3]);
    assert!(dw.is_none());
    c.reuse_grads_frame(frame);
    let frame = c.recv_grads(MessageKind::WeightGrad, 4).unwrap();
    let (dx, dw) = frame.grads().unwrap();
    assert!(dx.is_none());
    dw.unwrap().copy_into(&[2, 1], &mut out, true).unwrap();
    assert_eq!(out.data, [3.0, 4.0]);
    // A reply of another kind than the one awaited is refused, naming what came.
    c.send_request(&Request::ConvWeightGrad { layer: 4 })
        .unwrap();
    let e = c.recv_grads(MessageKind::InputGrad, 4).err().unwrap();
    assert!(e.to_string().contains("WeightGrad"), "{e}");
    // Another reply (an Ok to a Step) is refused.
    c.send_request(&Request::Step { lr: 0.1 }).unwrap();
    assert!(c.recv_grads(MessageKind::ConvGrads, 4).is_err());
    c.send_request(&Request::Shutdown).unwrap();
    drop(c);
    let _ = server.join();
}

#[test]
fn unscanned_data_checks_the_shape_and_length_only() {
    let w = wire(&[2], vec![1.0, f32::NAN]);
    assert_eq!(w.shaped_data_unscanned(&[2]).unwrap().len(), 2);
    assert!(w.shaped_data_unscanned(&[1, 2]).is_err());
    assert!(w.checked_data(&[2]).is_err());
    assert!(w.into_tensor_unscanned(&[2]).unwrap().data[1].is_nan());
}

#[test]
fn tensors_written_in_place_arrive_as_the_same_requests_and_bad_writes_are_refused() {
    let (a, b) = inproc_pair();
    let (tx, rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        serve(b, &mut |req| {
            let _ = tx.send(req.clone());
            match req {
                Request::ConvForward { layer, x_u, .. } => Reply::ConvOutput {
                    layer,
                    y_u: accelerator_result(
                        &Tensor::from_vec(x_u.shape(), x_u.data().to_vec()).unwrap(),
                    ),
                },
                _ => Reply::Ok,
            }
        })
    });
    let mut c = Client::connect(a).unwrap();
    let x = Tensor::from_vec(&[2, 1, 1, 3], vec![1.0, -2.0, 3.5, 4.0, 5.0, -0.25]).unwrap();
    // X_U in two pieces, the second first: the frame holds what an encoded ConvForward would.
    let mut f = c.start_conv_forward(7, &x.shape, true).unwrap();
    assert_eq!((f.len(), f.shape()), (6, &x.shape[..]));
    declassify_residual_into(&mut f, 3, &x.data[3..]).unwrap();
    declassify_residual_into(&mut f, 0, &x.data[..3]).unwrap();
    // Past the end, or the wrong function for the frame: refused, nothing written.
    assert!(declassify_residual_into(&mut f, 4, &x.data[..3]).is_err());
    assert!(declassify_residual_into(&mut f, usize::MAX, &x.data[..3]).is_err());
    assert!(declassify_output_grad_into(&mut f, &x).is_err());
    c.send_frame_expecting(f, 24).unwrap();
    let frame = c.recv_conv_output(7).unwrap();
    c.reuse_frame(frame);
    assert_eq!(
        rx.recv().unwrap(),
        Request::ConvForward {
            layer: 7,
            x_u: declassify_residual(&x),
            train: true,
        }
    );
    let mut f = c.start_conv_backward(2, &x.shape, false).unwrap();
    assert!(declassify_residual_into(&mut f, 0, &x.data).is_err());
    let other = Tensor::zeros(&[6]);
    assert!(declassify_output_grad_into(&mut f, &other).is_err());
    declassify_output_grad_into(&mut f, &x).unwrap();
    c.send_frame_expecting(f, 0).unwrap();
    assert!(c.recv_reply().is_ok());
    assert_eq!(
        rx.recv().unwrap(),
        Request::ConvBackward {
            layer: 2,
            dy: declassify_output_grad(&x),
            need_dx: false,
        }
    );
    // A frame with a value not written is not sent (its bytes would be whatever the buffer held).
    let mut f = c.start_conv_forward(5, &x.shape, false).unwrap();
    declassify_residual_into(&mut f, 0, &x.data[..2]).unwrap();
    declassify_residual_into(&mut f, 3, &x.data[3..]).unwrap();
    let e = c.send_frame_expecting(f, 24).unwrap_err();
    assert!(
        e.root()
            .to_string()
            .contains("value 2 of 6 was not written"),
        "{e}"
    );
    // A frame larger than the negotiated maximum is refused when it is started.
    assert!(c.start_conv_forward(1, &[1 << 20, 1 << 12], false).is_err());
    c.send_request(&Request::Shutdown).unwrap();
    drop(c);
    let _ = server.join();
}
