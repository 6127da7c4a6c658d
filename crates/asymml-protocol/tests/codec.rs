//! Encoding and decoding: every message variant round-trips, every malformed frame is the right error.

use asymml_core::Tensor;
use asymml_protocol::codec::{frame_body, request_body_len};
use asymml_protocol::*;

fn t(shape: &[usize], seed: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(shape, (0..n).map(|i| seed + i as f32 * 0.25).collect()).unwrap()
}

fn all_requests() -> Vec<Request> {
    vec![
        Request::Hello {
            version: PROTOCOL_VERSION,
            max_message: 12345,
        },
        Request::Register {
            layers: vec![
                ConvLayerSpec {
                    id: 0,
                    in_ch: 3,
                    out_ch: 4,
                    k: 3,
                    stride: 1,
                    pad: 1,
                    bias: true,
                },
                ConvLayerSpec {
                    id: 7,
                    in_ch: 4,
                    out_ch: 2,
                    k: 1,
                    stride: 2,
                    pad: 0,
                    bias: false,
                },
            ],
            weights: vec![
                (
                    public_weights(&t(&[4, 3, 3, 3], 0.5)),
                    Some(public_weights(&t(&[4], -1.0))),
                ),
                (public_weights(&t(&[2, 4, 1, 1], 2.0)), None),
            ],
        },
        Request::Register {
            layers: vec![],
            weights: vec![],
        },
        Request::ConvForward {
            layer: 3,
            x_u: declassify_residual(&t(&[2, 3, 4, 5], 1.0)),
            train: true,
        },
        Request::ConvForward {
            layer: u32::MAX,
            x_u: declassify_residual(&t(&[0, 3, 4, 5], 1.0)),
            train: false,
        },
        Request::ConvBackward {
            layer: 1,
            dy: declassify_output_grad(&t(&[2, 4, 3, 3], -3.0)),
            need_dx: false,
        },
        Request::ConvBackward {
            layer: 2,
            dy: declassify_output_grad(&t(&[1], 0.0)),
            need_dx: true,
        },
        Request::ConvInputGrad {
            layer: 3,
            dy: declassify_output_grad(&t(&[2, 4, 3, 3], 1.25)),
        },
        Request::ConvWeightGrad { layer: 7 },
        Request::SetWeights {
            layer: 9,
            w: declassify_updated_weights(&t(&[4, 3, 3, 3], 0.125)),
            b: Some(declassify_updated_weights(&t(&[4], 0.5))),
        },
        Request::SetWeights {
            layer: 1,
            w: declassify_updated_weights(&t(&[2, 4, 1, 1], 0.25)),
            b: None,
        },
        Request::Step { lr: 0.1 },
        Request::FetchWeights { layer: 4 },
        Request::ConvForwardShared {
            layer: 4,
            from_layer: 3,
            train: true,
        },
        Request::ConvForwardPart {
            layer: 2,
            first: 3,
            batch: 8,
            x_u: declassify_residual(&t(&[2, 4, 3, 3], 1.5)),
            train: true,
        },
        Request::RegisterNet {
            spec: "{\"arch\":\"VggSmall\"}".into(),
            state: vec![
                (
                    "features.0.weight".into(),
                    public_weights(&t(&[2, 1, 3, 3], 0.5)),
                ),
                (
                    "features.1.num_batches_tracked".into(),
                    public_weights(&t(&[], 3.0)),
                ),
            ],
            optimizer: OptimizerSpec::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
            },
        },
        Request::NetForward {
            x: public_weights(&t(&[2, 1, 4, 4], 0.25)),
            train: false,
        },
        Request::NetBackward {
            dlogits: public_weights(&t(&[2, 10], -0.1)),
        },
        Request::FetchState,
        Request::Shutdown,
    ]
}

fn all_replies() -> Vec<Reply> {
    vec![
        Reply::HelloAck {
            version: PROTOCOL_VERSION,
            max_message: MAX_MESSAGE,
        },
        Reply::Ok,
        Reply::ConvOutput {
            layer: 3,
            y_u: accelerator_result(&t(&[2, 4, 4, 5], 7.0)),
        },
        Reply::ConvGrads {
            layer: 1,
            dx: Some(accelerator_result(&t(&[2, 3, 5, 5], -0.5))),
            dw: accelerator_result(&t(&[4, 3, 3, 3], 0.25)),
        },
        Reply::ConvGrads {
            layer: 0,
            dx: None,
            dw: accelerator_result(&t(&[2, 4, 1, 1], 1.5)),
        },
        Reply::InputGrad {
            layer: 3,
            dx: accelerator_result(&t(&[2, 3, 5, 5], 0.75)),
        },
        Reply::WeightGrad {
            layer: 7,
            dw: accelerator_result(&t(&[4, 3, 3, 3], -1.0)),
        },
        Reply::Weights {
            layer: 2,
            w: accelerator_result(&t(&[4, 3, 3, 3], 1.0)),
            b: Some(accelerator_result(&t(&[4], 2.0))),
        },
        Reply::Weights {
            layer: 5,
            w: accelerator_result(&t(&[], 42.0)),
            b: None,
        },
        Reply::error("layer 12 is not registered — ünïcödé"),
        Reply::error(""),
        Reply::NetOutput {
            logits: accelerator_result(&t(&[2, 10], 1.5)),
        },
        Reply::State {
            entries: vec![("fc.bias".into(), accelerator_result(&t(&[10], 0.0)))],
        },
        Reply::State { entries: vec![] },
    ]
}

fn enc_req(r: &Request) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_request(r, MAX_MESSAGE, &mut buf).unwrap();
    buf
}

fn enc_rep(r: &Reply) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_reply(r, MAX_MESSAGE, &mut buf).unwrap();
    buf
}

/// A frame from a body (the length prefix computed).
fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

#[test]
fn every_request_round_trips() {
    let mut kinds = Vec::new();
    for r in all_requests() {
        let f = enc_req(&r);
        assert_eq!(f.len() as u64, 4 + request_body_len(&r).unwrap());
        assert_eq!(f[4], r.kind().code());
        assert_eq!(decode_request(&f, MAX_MESSAGE).unwrap(), r);
        assert_eq!(
            decode_message(&f, MAX_MESSAGE).unwrap(),
            Message::Request(r.clone())
        );
        kinds.push(r.kind());
    }
    for k in MessageKind::ALL.iter().filter(|k| k.is_request()) {
        assert!(kinds.contains(k), "{k} not covered");
    }
}

#[test]
fn every_reply_round_trips() {
    let mut kinds = Vec::new();
    for r in all_replies() {
        let f = enc_rep(&r);
        assert_eq!(f[4], r.kind().code());
        assert_eq!(decode_reply(&f, MAX_MESSAGE).unwrap(), r);
        assert_eq!(
            decode_message(&f, MAX_MESSAGE).unwrap(),
            Message::Reply(r.clone())
        );
        kinds.push(r.kind());
    }
    for k in MessageKind::ALL.iter().filter(|k| !k.is_request()) {
        assert!(kinds.contains(k), "{k} not covered");
    }
}

#[test]
fn wire_layout_is_as_documented() {
    let x = declassify_residual(&Tensor::from_vec(&[1, 2], vec![1.0, -2.5]).unwrap());
    let f = enc_req(&Request::ConvForward {
        layer: 0x0102_0304,
        x_u: x,
        train: true,
    });
    let mut want = vec![0x03, 4, 3, 2, 1, 2, 1, 0, 0, 0, 2, 0, 0, 0];
    want.extend_from_slice(&1.0f32.to_le_bytes());
    want.extend_from_slice(&(-2.5f32).to_le_bytes());
    want.push(1);
    assert_eq!(f, frame(&want));
}

#[test]
fn non_finite_values_and_odd_bits_round_trip_exactly() {
    let data = vec![
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        1e-45,
        f32::MAX,
    ];
    let r = Request::ConvForward {
        layer: 0,
        x_u: declassify_residual(&Tensor::from_vec(&[6], data.clone()).unwrap()),
        train: false,
    };
    let Request::ConvForward { x_u, .. } = decode_request(&enc_req(&r), MAX_MESSAGE).unwrap()
    else {
        panic!()
    };
    let bits: Vec<u32> = x_u.data().iter().map(|v| v.to_bits()).collect();
    assert_eq!(bits, data.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
}

#[test]
fn large_tensors_copied_on_several_threads_round_trip_exactly() {
    // 3·2^20 + 5 values: copied in and out of the frame in several chunks where the machine has the cores.
    let n = 3 * (1 << 20) + 5;
    let data: Vec<f32> = (0..n)
        .map(|i| f32::from_bits((i as u32).wrapping_mul(2_654_435_761)))
        .collect();
    let r = Request::ConvForward {
        layer: 1,
        x_u: declassify_residual(
            &Tensor::from_vec(&[1, 5, n / 5, 1], data[..n / 5 * 5].to_vec()).unwrap(),
        ),
        train: true,
    };
    let want: Vec<u32> = data[..n / 5 * 5].iter().map(|v| v.to_bits()).collect();
    // On 1 and 4 threads (this thread's copy budget).
    let mut frames = Vec::new();
    for threads in [1, 4] {
        asymml_protocol::codec::set_copy_threads(threads);
        {
            let f = enc_req(&r);
            assert_eq!(f.len() as u64, 4 + request_body_len(&r).unwrap());
            let Request::ConvForward { x_u, .. } = decode_request(&f, MAX_MESSAGE).unwrap() else {
                panic!()
            };
            let bits: Vec<u32> = x_u.data().iter().map(|v| v.to_bits()).collect();
            assert_eq!(bits, want, "{threads} threads");
            // Into a buffer that already holds a frame: its contents are replaced.
            let mut buf = vec![7u8; 100];
            encode_request(&r, MAX_MESSAGE, &mut buf).unwrap();
            assert_eq!(buf, f);
            frames.push(f);
        }
    }
    asymml_protocol::codec::set_copy_threads(1);
    assert_eq!(frames[0], frames[1]);
}

#[test]
fn encoding_reuses_the_buffer_and_replaces_its_contents() {
    let mut buf = vec![9u8; 1000];
    encode_request(&Request::Shutdown, MAX_MESSAGE, &mut buf).unwrap();
    assert_eq!(buf, frame(&[0x08]));
}

#[test]
fn encoding_refuses_what_cannot_be_decoded() {
    let mut buf = Vec::new();
    // Over the maximum message size.
    let big = Request::ConvForward {
        layer: 0,
        x_u: declassify_residual(&Tensor::zeros(&[100])),
        train: false,
    };
    let e = encode_request(&big, 100, &mut buf).unwrap_err();
    assert!(
        matches!(e, ProtocolError::TooLarge { len: 411, max: 100 }),
        "{e}"
    );
    // Rank above the maximum.
    let r9 = Request::SetWeights {
        layer: 0,
        w: declassify_updated_weights(&Tensor::zeros(&[1; 9])),
        b: None,
    };
    let e = encode_request(&r9, MAX_MESSAGE, &mut buf).unwrap_err();
    assert!(matches!(e, ProtocolError::Encode(_)), "{e}");
    assert!(e.to_string().contains("rank 9"), "{e}");
    // A tensor whose data disagrees with its shape.
    let bad = Tensor {
        shape: vec![2, 2],
        data: vec![0.0; 3],
    };
    let e = encode_reply(
        &Reply::ConvOutput {
            layer: 0,
            y_u: accelerator_result(&bad),
        },
        MAX_MESSAGE,
        &mut buf,
    )
    .unwrap_err();
    assert!(e.to_string().contains("needs 4 values, holds 3"), "{e}");
    // A dimension above u32::MAX.
    #[cfg(target_pointer_width = "64")]
    {
        let huge = Tensor {
            shape: vec![1 << 33, 0],
            data: vec![],
        };
        let e = encode_request(
            &Request::ConvBackward {
                layer: 0,
                dy: declassify_output_grad(&huge),
                need_dx: true,
            },
            MAX_MESSAGE,
            &mut buf,
        )
        .unwrap_err();
        assert!(e.to_string().contains("exceeds u32::MAX"), "{e}");
    }
}

// ----- malformed frames ---------------------------------------------------------------------------------------

#[test]
fn short_frames_and_bad_prefixes() {
    for f in [&[][..], &[1], &[1, 0, 0]] {
        let e = decode_request(f, MAX_MESSAGE).unwrap_err();
        assert!(matches!(e, ProtocolError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("length prefix"), "{e}");
    }
    // Empty body: no type byte.
    let e = decode_request(&frame(&[]), MAX_MESSAGE).unwrap_err();
    assert!(e.to_string().contains("message type"), "{e}");
    // Prefix disagreeing with the bytes present (both ways).
    let mut f = enc_req(&Request::Step { lr: 1.0 });
    f[0] += 1;
    let e = decode_request(&f, MAX_MESSAGE).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::LengthMismatch {
                prefix: 6,
                actual: 5
            }
        ),
        "{e}"
    );
    f[0] -= 2;
    let e = decode_request(&f, MAX_MESSAGE).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::LengthMismatch {
                prefix: 4,
                actual: 5
            }
        ),
        "{e}"
    );
}

#[test]
fn every_truncation_of_every_message_is_an_error() {
    let frames: Vec<Vec<u8>> = all_requests()
        .iter()
        .map(enc_req)
        .chain(all_replies().iter().map(enc_rep))
        .collect();
    for f in frames {
        let body = &f[4..];
        for cut in 0..body.len() {
            let e = decode_message(&frame(&body[..cut]), MAX_MESSAGE).unwrap_err();
            assert!(
                matches!(
                    e,
                    ProtocolError::Truncated { .. } | ProtocolError::TensorLength { .. }
                ),
                "type 0x{:02x} cut at {cut}: {e}",
                body[0]
            );
        }
    }
}

#[test]
fn truncation_names_the_field() {
    let f = enc_req(&Request::Hello {
        version: 1,
        max_message: 2,
    });
    let e = decode_request(&frame(&f[4..7]), MAX_MESSAGE).unwrap_err();
    assert_eq!(
        e.to_string(),
        "truncated frame: Hello.version needs 4 bytes, 2 left"
    );
}

#[test]
fn unknown_type_bytes() {
    for b in [0x00u8, 0x12, 0x42, 0x7f, 0x80, 0x8b, 0xff] {
        let e = decode_message(&frame(&[b, 0, 0]), MAX_MESSAGE).unwrap_err();
        assert!(
            matches!(e, ProtocolError::UnknownType { byte, .. } if byte == b),
            "{e}"
        );
    }
    // A reply where a request is expected and the other way round: refused by the type byte.
    let e = decode_request(&enc_rep(&Reply::Ok), MAX_MESSAGE).unwrap_err();
    assert_eq!(e.to_string(), "unknown request type byte 0x82");
    let e = decode_reply(&enc_req(&Request::Shutdown), MAX_MESSAGE).unwrap_err();
    assert_eq!(e.to_string(), "unknown reply type byte 0x08");
}

#[test]
fn length_over_the_maximum_is_refused_from_the_prefix() {
    let f = enc_req(&Request::Step { lr: 1.0 });
    let e = decode_request(&f, 4).unwrap_err();
    assert!(
        matches!(e, ProtocolError::TooLarge { len: 5, max: 4 }),
        "{e}"
    );
    // Checked before the body is even looked at: a prefix claiming 4 GiB with no body.
    let e = decode_request(&[0xff, 0xff, 0xff, 0xff], MAX_MESSAGE).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::TooLarge {
                len: 0xffff_ffff,
                ..
            }
        ),
        "{e}"
    );
    assert!(decode_request(&f, 5).is_ok());
}

#[test]
fn trailing_bytes() {
    for r in all_requests() {
        let mut body = enc_req(&r)[4..].to_vec();
        body.push(0);
        let e = decode_request(&frame(&body), MAX_MESSAGE).unwrap_err();
        assert!(
            matches!(e, ProtocolError::TrailingBytes { count: 1, .. }),
            "{e}"
        );
    }
    let mut body = enc_rep(&Reply::Ok)[4..].to_vec();
    body.extend_from_slice(&[1, 2, 3]);
    let e = decode_reply(&frame(&body), MAX_MESSAGE).unwrap_err();
    assert_eq!(
        e.to_string(),
        "3 trailing bytes after a complete Ok message"
    );
}

/// A ConvForward body with the tensor header `rank, dims` and `payload` bytes after it.
fn conv_forward_body(rank: u8, dims: &[u32], payload: usize) -> Vec<u8> {
    let mut b = vec![0x03, 0, 0, 0, 0, rank];
    for d in dims {
        b.extend_from_slice(&d.to_le_bytes());
    }
    b.extend(std::iter::repeat_n(0u8, payload));
    b.push(0); // train
    b
}

#[test]
fn rank_above_eight() {
    let e = decode_request(&frame(&conv_forward_body(9, &[1; 9], 4)), MAX_MESSAGE).unwrap_err();
    assert!(matches!(e, ProtocolError::Rank { rank: 9, max: 8 }), "{e}");
    let e = decode_request(&frame(&conv_forward_body(255, &[], 0)), MAX_MESSAGE).unwrap_err();
    assert!(matches!(e, ProtocolError::Rank { rank: 255, .. }), "{e}");
    // Rank 8 is fine.
    let ok = decode_request(&frame(&conv_forward_body(8, &[1; 8], 4)), MAX_MESSAGE).unwrap();
    assert_eq!(ok.tensors()[0].1.shape(), &[1; 8]);
}

#[test]
fn dims_whose_product_overflows() {
    let e = decode_request(
        &frame(&conv_forward_body(8, &[u32::MAX; 8], 0)),
        MAX_MESSAGE,
    )
    .unwrap_err();
    assert!(matches!(e, ProtocolError::DimsOverflow { .. }), "{e}");
    // The element count fits in u64 but the byte count does not.
    let e = decode_request(
        &frame(&conv_forward_body(3, &[1 << 31, 1 << 31, 2], 0)),
        MAX_MESSAGE,
    )
    .unwrap_err();
    assert!(matches!(e, ProtocolError::DimsOverflow { .. }), "{e}");
}

#[test]
fn dims_disagreeing_with_the_remaining_length() {
    // 2^20 x 2^20 floats claimed (4 TiB) in a frame of a few bytes: refused before allocating.
    let e = decode_request(
        &frame(&conv_forward_body(2, &[1 << 20, 1 << 20], 8)),
        MAX_MESSAGE,
    )
    .unwrap_err();
    match &e {
        ProtocolError::TensorLength {
            field,
            shape,
            needed,
            available,
        } => {
            assert_eq!(*field, "x_u");
            assert_eq!(shape, &[1 << 20, 1 << 20]);
            assert_eq!(*needed, 1 << 42);
            assert_eq!(*available, 9);
        }
        _ => panic!("{e}"),
    }
    // One float short: the train byte is taken as payload, then the bool is missing.
    let e = decode_request(&frame(&conv_forward_body(1, &[3], 8)), MAX_MESSAGE).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::TensorLength {
                needed: 12,
                available: 9,
                ..
            }
        ),
        "{e}"
    );
    // One float too many: trailing bytes.
    let e = decode_request(&frame(&conv_forward_body(1, &[1], 8)), MAX_MESSAGE).unwrap_err();
    assert!(
        matches!(e, ProtocolError::TrailingBytes { count: 4, .. }),
        "{e}"
    );
}

#[test]
fn bad_utf8() {
    let mut body = vec![0x86, 3, 0, 0, 0];
    body.extend_from_slice(&[b'a', 0xff, 0xfe]);
    let e = decode_reply(&frame(&body), MAX_MESSAGE).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::Utf8 {
                what: "Error.message",
                ..
            }
        ),
        "{e}"
    );
    // A string length beyond the frame: truncated, nothing allocated.
    let body = vec![0x86, 0xff, 0xff, 0xff, 0xff, b'a'];
    let e = decode_reply(&frame(&body), MAX_MESSAGE).unwrap_err();
    assert!(matches!(e, ProtocolError::Truncated { .. }), "{e}");
}

#[test]
fn bad_bools_option_tags_and_optimizer_kinds() {
    let mut body = conv_forward_body(1, &[1], 4);
    *body.last_mut().unwrap() = 2;
    let e = decode_request(&frame(&body), MAX_MESSAGE).unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid ConvForward.train: bool byte 2 (expected 0 or 1)"
    );

    let e = decode_reply(&frame(&[0x84, 0, 0, 0, 0, 7]), MAX_MESSAGE).unwrap_err();
    assert!(
        matches!(e, ProtocolError::InvalidValue { what: "dx", .. }),
        "{e}"
    );

    // RegisterNet with an empty spec, no state and optimizer kind 5.
    let e = decode_request(&frame(&[0x0b, 0, 0, 0, 0, 0, 0, 0, 0, 5]), MAX_MESSAGE).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::InvalidValue {
                what: "optimizer kind",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn huge_counts_do_not_allocate() {
    // Register claiming 2^32-1 layers in a frame of 9 bytes.
    let e = decode_request(
        &frame(&[0x02, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]),
        MAX_MESSAGE,
    )
    .unwrap_err();
    assert!(matches!(e, ProtocolError::Truncated { .. }), "{e}");
    // ... and 2^32-1 weight pairs (the first one a rank-0 tensor without its value).
    let e = decode_request(
        &frame(&[0x02, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0]),
        MAX_MESSAGE,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::TensorLength {
                needed: 4,
                available: 0,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn random_corruptions_never_panic() {
    let frames: Vec<Vec<u8>> = all_requests()
        .iter()
        .map(enc_req)
        .chain(all_replies().iter().map(enc_rep))
        .collect();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut errors = 0;
    for i in 0..20_000 {
        let mut f = frames[i % frames.len()].clone();
        for _ in 0..1 + next() % 4 {
            let pos = 4 + (next() as usize) % (f.len() - 4);
            f[pos] = next() as u8;
        }
        if next() % 4 == 0 {
            let keep = 4 + (next() as usize) % (f.len() - 3);
            f.truncate(keep);
            let n = (f.len() - 4) as u32;
            f[..4].copy_from_slice(&n.to_le_bytes());
        }
        if let Err(e) = decode_message(&f, 1 << 20) {
            assert!(!e.to_string().is_empty());
            errors += 1;
        }
        let _ = frame_body(&f, 1 << 20);
    }
    assert!(errors > 1000, "corruptions should mostly fail: {errors}");
}
