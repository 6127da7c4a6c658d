//! Times the Freivalds passes on one big tensor against a plain read of it (a profiling aid):
//! `cargo run --release --example freivalds_speed -- B C P`. `FRAME_GAP=G` (default 2) places the received
//! frame's values G bytes (mod 4096) past the merged output's: below 64, loads of one and stores to the other
//! alias in the 4 KiB store-forwarding check (the "from frame" row then takes about twice as long); in the
//! product they were 90 bytes or more apart.
use asymml_core::freivalds::{
    combine_pass, lhs_pass, merge_into_lhs_pass, merge_lhs_pass, sum_squares, Combined, Lhs,
};
use std::time::Instant;

fn best(mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("B C P"))
        .collect();
    let (b, c, p) = match a[..] {
        [b, c, p] => (b, c, p),
        _ => (8, 64, 224 * 224),
    };
    let (r, kk) = (2, 9);
    let data: Vec<f32> = (0..b * c * p)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3)
        .collect();
    let gb = (data.len() * 4) as f64 / 1e9;
    let coef: Vec<f64> = (0..r * b).map(|i| 1.0 + (i % 7) as f64 / 7.0).collect();
    let w: Vec<f32> = (0..r * kk * c).map(|i| (i % 5) as f32 * 0.1).collect();
    let t: Vec<f64> = (0..r * c).map(|i| 1.0 + (i % 3) as f64 / 3.0).collect();
    let k: Vec<f64> = (0..r * b * c)
        .map(|i| 1.0 + (i % 11) as f64 / 11.0)
        .collect();
    let mut comb = Combined::default();
    let mut lhs = Lhs::default();
    let mut s = 0.0;
    let read = best(|| s += sum_squares(&data));
    let mut copy = vec![0f32; data.len()];
    let cp = best(|| copy.copy_from_slice(&data));
    let fwd = best(|| combine_pass(&data, b, c, p, r, Some((&coef, &w, kk)), None, &mut comb));
    let trn = best(|| {
        combine_pass(
            &data,
            b,
            c,
            p,
            r,
            Some((&coef, &w, kk)),
            Some(&t),
            &mut comb,
        )
    });
    let chn = best(|| combine_pass(&data, b, c, p, r, None, Some(&t), &mut comb));
    let lh = best(|| lhs_pass(&data, b, c, p, r, &k, &mut lhs));
    let mut y = data.clone();
    let mg = best(|| merge_lhs_pass(&mut y, &copy, b, c, p, r, &k, &mut lhs));
    // As received: little-endian words two bytes past 4-alignment in a frame, merged into a separate buffer,
    // `FRAME_GAP` bytes past it modulo a page.
    let gap: usize = std::env::var("FRAME_GAP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut frame = vec![0u8; 8192 + 4 * data.len()];
    let ya = y.as_ptr() as usize;
    let fa = frame.as_ptr() as usize;
    let o = (0..8192)
        .find(|o| (fa + o).wrapping_sub(ya) % 4096 == gap && (fa + o) % 4 == 2)
        .unwrap_or(2);
    for (w, v) in frame[o..].chunks_exact_mut(4).zip(&data) {
        w.copy_from_slice(&v.to_le_bytes());
    }
    let (words, _) = frame[o..o + 4 * data.len()].as_chunks::<4>();
    let mi = best(|| merge_into_lhs_pass(words, &mut y, b, c, p, r, &k, &mut lhs));
    let ad = best(|| {
        y.iter_mut()
            .zip(data.iter().zip(&copy))
            .for_each(|(o, (a, b))| *o = a + b)
    });
    let ip = best(|| y.iter_mut().zip(&copy).for_each(|(o, a)| *o += a));
    let mut tiled = |tile: usize| {
        best(|| {
            for p0 in (0..p).step_by(tile) {
                let tl = tile.min(p - p0);
                for bc in 0..b * c {
                    s += sum_squares(&data[bc * p + p0..][..tl]);
                }
            }
        })
    };
    for tile in [512, 1024, 4096, 16384] {
        let t = tiled(tile);
        println!(
            "tiled read {tile:6}        {:7.2} ms  {:5.2} GB/s",
            t * 1e3,
            gb / t
        );
    }
    let lh1 = best(|| lhs_pass(&data, b, c, p, 1, &k[..b * c], &mut lhs));
    let fk1 = best(|| {
        combine_pass(
            &data,
            b,
            c,
            p,
            1,
            Some((&coef[..b], &w[..c], 1)),
            None,
            &mut comb,
        )
    });
    let fk9 = best(|| {
        combine_pass(
            &data,
            b,
            c,
            p,
            1,
            Some((&coef[..b], &w[..kk * c], kk)),
            None,
            &mut comb,
        )
    });
    let no = best(|| combine_pass(&data, b, c, p, 1, None, None, &mut comb));
    println!(
        "lhs r=1 {:.2} ms, combine r=1 kk=1 {:.2} ms, r=1 kk=9 {:.2} ms, sq only {:.2} ms",
        lh1 * 1e3,
        fk1 * 1e3,
        fk9 * 1e3,
        no * 1e3
    );
    println!("[{b}, {c}, {p}] {gb:.3} GB (checksum {s:.1})");
    for (name, t) in [
        ("sum of squares", read),
        ("copy", cp),
        ("combine (forward)", fwd),
        ("combine (training fwd)", trn),
        ("combine (chan only)", chn),
        ("lhs", lh),
        ("merge + lhs (in place)", mg),
        ("merge + lhs (from frame)", mi),
        ("merge alone", ad),
        ("add in place", ip),
    ] {
        println!("{name:24} {:7.2} ms  {:5.2} GB/s", t * 1e3, gb / t);
    }
}
