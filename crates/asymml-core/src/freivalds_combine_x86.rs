//! [`super::combine_pass`] for two repetitions in AVX2 registers. The generic pass keeps every partial sum
//! in memory (a load and a store per multiply-add); here, per 8 pixels, the sums that run over channels stay
//! in registers: a pair of samples is read at once (each accumulator row of the batch combination is loaded
//! and stored once per two values), the per-sample squares and channel projections are register sums over a
//! block of [`BLOCK`] channels, and the contraction of the batch combination keeps up to nine offsets' sums
//! in registers while it reads each combined row once. The rounding is the generic pass's: f32 sums over at
//! most [`BLOCK`] channels (the squares over all channels, the batch combination over the batch, as there)
//! added in f64.

use super::{Combined, BLOCK, PAD};
use std::arch::x86_64::*;

/// What the pass collects: the batch combination with its contraction, and/or the channel projections.
#[derive(Clone, Copy)]
struct Want {
    batch: bool,
    chan: bool,
}

/// [`super::combine_pass_range`] with R = 2 on pixel tiles of `tile`, into `out` (already zeroed at its
/// sizes): pixels `q0 .. q0 + p` of `data`, whose rows are `dp` long; false (nothing done) without AVX2 and
/// FMA.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(super) fn combine_r2(
    data: &[f32],
    bsz: usize,
    ch: usize,
    (dp, q0, p): (usize, usize, usize),
    batch: Option<(&[f64], &[f32], usize)>,
    chan: Option<&[f64]>,
    tile: usize,
    out: &mut Combined,
) -> bool {
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
        return false;
    }
    let kk = batch.map_or(0, |(_, _, kk)| kk);
    assert!(
        data.len() == bsz * ch * dp
            && q0 + p <= dp
            && batch.is_none_or(|(c, w, kk)| c.len() == 2 * bsz && w.len() == 2 * kk * ch)
            && chan.is_none_or(|t| t.len() == 2 * ch)
            && out.contracted.len() == 2 * kk * p
            && out.comb_sq.len() == if batch.is_some() { 2 * p } else { 0 }
            && out.bsq.len() == bsz * p
            && out.proj.len() == if chan.is_some() { 2 * bsz * p } else { 0 }
            && out.chn2.len() == if chan.is_some() { ch } else { 0 }
            && tile >= 1,
        "combine_r2: sizes"
    );
    // Per sample: c of both repetitions; per channel: t of both; in f32 as the generic pass uses them.
    let cf: Vec<[f32; 2]> = (0..bsz)
        .map(|b| batch.map_or([0.0; 2], |(c, _, _)| [c[b] as f32, c[bsz + b] as f32]))
        .collect();
    let tf: Vec<[f32; 2]> = (0..ch)
        .map(|j| chan.map_or([0.0; 2], |t| [t[j] as f32, t[ch + j] as f32]))
        .collect();
    let w = batch.map_or(&[][..], |(_, w, _)| w);
    let stride = tile + PAD;
    let scratch = || Scratch {
        comb: vec![0f32; if batch.is_some() { 2 * ch * stride } else { 0 }],
        sq: vec![0f32; 2 * stride],
        chn: vec![0f32; if chan.is_some() { 8 * ch } else { 0 }],
        stride,
    };
    let want = Want {
        batch: batch.is_some(),
        chan: chan.is_some(),
    };
    let dims = Dims {
        bsz,
        ch,
        p,
        kk,
        dp,
        q0,
    };
    let at = Out {
        contracted: out.contracted.as_mut_ptr(),
        comb_sq: out.comb_sq.as_mut_ptr(),
        bsq: out.bsq.as_mut_ptr(),
        proj: out.proj.as_mut_ptr(),
    };
    // One tile: its outputs go straight to their pixel columns; its channels' squares come back (summed
    // into `chn2` in tile order below, so the result does not depend on the threads).
    let run = |s: &mut Scratch, t: usize| -> Vec<f64> {
        let p0 = t * tile;
        let tl = tile.min(p - p0);
        // SAFETY: AVX2 and FMA were detected above; the sizes the kernels index by were asserted above and
        // the scratch rows are `stride` ≥ tl floats apart (see each kernel's comment). Each tile writes only
        // its own pixel columns p0..p0 + tl of the outputs, so tiles on other threads touch other values.
        unsafe {
            // The batch combination needs no zeroing: the first pair of samples writes it.
            for b0 in (0..bsz).step_by(2) {
                samples(data, dims, want, (p0, tl), b0, &cf, &tf, s, at);
            }
            if want.batch {
                for ri in 0..2 {
                    contract(dims, ri, (p0, tl), w, s, at);
                }
            }
        }
        s.chn
            .chunks_exact_mut(8)
            .map(|lanes| {
                let v = lanes.iter().map(|&v| v as f64).sum::<f64>();
                lanes.iter_mut().for_each(|v| *v = 0.0);
                v
            })
            .collect()
    };
    let tiles = p.div_ceil(tile);
    let chn: Vec<Vec<f64>> =
        if tiles > 1 && rayon::current_num_threads() > 1 && bsz * ch * p >= PAR_MIN_VALUES {
            use rayon::prelude::*;
            (0..tiles).into_par_iter().map_init(scratch, run).collect()
        } else {
            let mut s = scratch();
            (0..tiles).map(|t| run(&mut s, t)).collect()
        };
    if want.chan {
        for part in &chn {
            out.chn2.iter_mut().zip(part).for_each(|(n2, v)| *n2 += v);
        }
    }
    true
}

/// Below this many values the tiles run on the calling thread.
const PAR_MIN_VALUES: usize = 1 << 20;

/// Where a pass's per-pixel outputs live ([`Combined`]'s `contracted`, `comb_sq`, `bsq` and `proj`), shared by
/// the tiles that run on several threads.
#[derive(Clone, Copy)]
struct Out {
    contracted: *mut f64,
    comb_sq: *mut f64,
    bsq: *mut f64,
    proj: *mut f64,
}
// SAFETY: the tiles that share an `Out` write disjoint pixel columns of each output (see `combine_r2`), and
// `combine_r2` holds the `Combined` they point into exclusively until every tile is done.
unsafe impl Send for Out {}
// SAFETY: as for `Send`.
unsafe impl Sync for Out {}

/// Channels a pair of samples is read over per 8 pixels ([`samples`]): 2·SUB rows of data and as many of
/// the batch combination are live at once, which a first-level TLB of 64 entries holds.
const SUB: usize = 8;
/// Floats ahead of the vector at hand that each row is prefetched (the rows of a tile are read a vector at a
/// time each, in turn: too many streams for the hardware prefetcher).
const PF: usize = 128;

/// The shapes of a pass: samples, channels, pixels, kernel offsets; the data's row length and the pixel
/// of its rows at which the pass's pixels start.
#[derive(Clone, Copy)]
struct Dims {
    bsz: usize,
    ch: usize,
    p: usize,
    kk: usize,
    dp: usize,
    q0: usize,
}

/// The f32 accumulators of one tile: the batch combination [2, C, stride], the squares of the pair of
/// samples [2, stride], and each channel's squares in 8 lanes [C, 8].
struct Scratch {
    comb: Vec<f32>,
    sq: Vec<f32>,
    chn: Vec<f32>,
    stride: usize,
}

/// Adds the 8 f32 lanes of `v` to the 8 f64 values at `dst`.
///
/// # Safety
/// AVX2 must be available and `dst` valid for reading and writing 8 f64.
#[target_feature(enable = "avx2,fma")]
unsafe fn add_f64(dst: *mut f64, v: __m256) {
    let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
    // SAFETY: the caller's contract: 8 f64 at `dst`.
    unsafe {
        _mm256_storeu_pd(dst, _mm256_add_pd(_mm256_loadu_pd(dst), lo));
        _mm256_storeu_pd(dst.add(4), _mm256_add_pd(_mm256_loadu_pd(dst.add(4)), hi));
    }
}

/// Samples b0 and b0 + 1 (if any) of the tile at pixels p0..p0 + tl: their squares into `out.bsq`, their
/// channel projections into `out.proj` and each channel's squares into `s.chn` (with `want.chan`), their
/// share of the batch combination into `s.comb` (with `want.batch`).
///
/// # Safety
/// AVX2 and FMA must be available; the sizes are those [`combine_r2`] asserted, p0 + tl ≤ P and tl ≤ stride.
/// Every vector access reads 8 floats at pixel v < tl − tl mod 8 of a row, so stays inside its row.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn samples(
    data: &[f32],
    d: Dims,
    want: Want,
    (p0, tl): (usize, usize),
    b0: usize,
    cf: &[[f32; 2]],
    tf: &[[f32; 2]],
    s: &mut Scratch,
    out: Out,
) {
    let (ch, p, stride) = (d.ch, d.p, s.stride);
    let two = b0 + 1 < d.bsz;
    let tv = tl / 8 * 8;
    let zero = _mm256_setzero_ps();
    let (ca, cb) = (cf[b0], if two { cf[b0 + 1] } else { [0.0; 2] });
    s.sq[..tl].iter_mut().for_each(|v| *v = 0.0);
    s.sq[stride..stride + tl].iter_mut().for_each(|v| *v = 0.0);
    let dp = data.as_ptr();
    let row = |b: usize, j: usize| (b * ch + j) * d.dp + d.q0 + p0;
    for j0 in (0..ch).step_by(SUB) {
        let j1 = (j0 + SUB).min(ch);
        for v in (0..tv).step_by(8) {
            // SAFETY: rows of `data` hold q0 + P ≥ q0 + p0 + v + 8 floats from `row`; the scratch rows
            // hold `stride` ≥ v + 8; `chn` holds 8 per channel; `out.proj` rows hold P.
            unsafe {
                let sqp = s.sq.as_mut_ptr();
                let (mut sqa, mut sqb) = (
                    _mm256_loadu_ps(sqp.add(v)),
                    _mm256_loadu_ps(sqp.add(stride + v)),
                );
                let mut pr = [zero; 4];
                for j in j0..j1 {
                    if v % 16 == 0 {
                        _mm_prefetch::<_MM_HINT_T0>(
                            dp.wrapping_add(row(b0, j) + v + PF).cast::<i8>(),
                        );
                        if two {
                            _mm_prefetch::<_MM_HINT_T0>(
                                dp.wrapping_add(row(b0 + 1, j) + v + PF).cast::<i8>(),
                            );
                        }
                    }
                    let xa = _mm256_loadu_ps(dp.add(row(b0, j) + v));
                    let xb = if two {
                        _mm256_loadu_ps(dp.add(row(b0 + 1, j) + v))
                    } else {
                        zero
                    };
                    sqa = _mm256_fmadd_ps(xa, xa, sqa);
                    sqb = _mm256_fmadd_ps(xb, xb, sqb);
                    if want.chan {
                        let (t0, t1) = (_mm256_set1_ps(tf[j][0]), _mm256_set1_ps(tf[j][1]));
                        pr[0] = _mm256_fmadd_ps(t0, xa, pr[0]);
                        pr[1] = _mm256_fmadd_ps(t1, xa, pr[1]);
                        pr[2] = _mm256_fmadd_ps(t0, xb, pr[2]);
                        pr[3] = _mm256_fmadd_ps(t1, xb, pr[3]);
                        let cp = s.chn.as_mut_ptr().add(8 * j);
                        let sq2 = _mm256_fmadd_ps(xa, xa, _mm256_mul_ps(xb, xb));
                        _mm256_storeu_ps(cp, _mm256_add_ps(_mm256_loadu_ps(cp), sq2));
                    }
                    if want.batch {
                        for (ri, at) in [(0, j), (1, ch + j)] {
                            let cp = s.comb.as_mut_ptr().add(at * stride + v);
                            let old = if b0 == 0 { zero } else { _mm256_loadu_ps(cp) };
                            let acc = _mm256_fmadd_ps(_mm256_set1_ps(ca[ri]), xa, old);
                            let acc = _mm256_fmadd_ps(_mm256_set1_ps(cb[ri]), xb, acc);
                            _mm256_storeu_ps(cp, acc);
                        }
                    }
                }
                _mm256_storeu_ps(sqp.add(v), sqa);
                _mm256_storeu_ps(sqp.add(stride + v), sqb);
                if want.chan {
                    let pp = out.proj;
                    for ri in 0..2 {
                        add_f64(pp.add((ri * d.bsz + b0) * p + p0 + v), pr[ri]);
                        if two {
                            add_f64(pp.add((ri * d.bsz + b0 + 1) * p + p0 + v), pr[2 + ri]);
                        }
                    }
                }
            }
        }
        // The last tl mod 8 pixels, the same sums one pixel at a time.
        for v in tv..tl {
            let mut pr = [0f32; 4];
            for j in j0..j1 {
                let xa = data[row(b0, j) + v];
                let xb = if two { data[row(b0 + 1, j) + v] } else { 0.0 };
                s.sq[v] += xa * xa;
                s.sq[stride + v] += xb * xb;
                if want.chan {
                    pr[0] += tf[j][0] * xa;
                    pr[1] += tf[j][1] * xa;
                    pr[2] += tf[j][0] * xb;
                    pr[3] += tf[j][1] * xb;
                    s.chn[8 * j] += xa * xa + xb * xb;
                }
                if want.batch {
                    for (ri, at) in [(0, j), (1, ch + j)] {
                        let old = if b0 == 0 {
                            0.0
                        } else {
                            s.comb[at * stride + v]
                        };
                        s.comb[at * stride + v] = old + (ca[ri] * xa + cb[ri] * xb);
                    }
                }
            }
            if want.chan {
                for ri in 0..2 {
                    // SAFETY: `out.proj` rows hold P > p0 + v ([2, B, P], asserted by the caller).
                    unsafe {
                        *out.proj.add((ri * d.bsz + b0) * p + p0 + v) += pr[ri] as f64;
                        if two {
                            *out.proj.add((ri * d.bsz + b0 + 1) * p + p0 + v) += pr[2 + ri] as f64;
                        }
                    }
                }
            }
        }
    }
    for (k, b) in [(0, b0), (1, b0 + 1)] {
        if k == 1 && !two {
            break;
        }
        for (i, &v) in s.sq[k * stride..][..tl].iter().enumerate() {
            // SAFETY: `out.bsq` ([B, P]) holds row b's pixels p0 + i < p0 + tl ≤ P.
            unsafe { *out.bsq.add(b * p + p0 + i) = v as f64 };
        }
    }
}

/// Repetition `ri`'s batch combination of the tile contracted with its weights `w` ([2, kk, C]) into
/// `out.contracted`, and its squares into `out.comb_sq`: up to nine offsets at a time in registers.
///
/// # Safety
/// As [`samples`].
#[target_feature(enable = "avx2,fma")]
unsafe fn contract(d: Dims, ri: usize, (p0, tl): (usize, usize), w: &[f32], s: &Scratch, out: Out) {
    let mut o0 = 0;
    while o0 < d.kk {
        // SAFETY: the caller's contract; offsets o0.. o0 + K ≤ kk.
        unsafe {
            if d.kk - o0 >= 9 {
                offsets::<9>(d, ri, o0, (p0, tl), w, s, out);
                o0 += 9;
            } else {
                offsets::<1>(d, ri, o0, (p0, tl), w, s, out);
                o0 += 1;
            }
        }
    }
}

/// Offsets o0..o0 + K of [`contract`] (and, for o0 = 0, the squares).
///
/// # Safety
/// As [`samples`], and o0 + K ≤ kk.
#[target_feature(enable = "avx2,fma")]
unsafe fn offsets<const K: usize>(
    d: Dims,
    ri: usize,
    o0: usize,
    (p0, tl): (usize, usize),
    w: &[f32],
    s: &Scratch,
    out: Out,
) {
    let (ch, p, kk, stride) = (d.ch, d.p, d.kk, s.stride);
    let tv = tl / 8 * 8;
    let squares = o0 == 0;
    let wv = |o: usize, j: usize| w[(ri * kk + o0 + o) * ch + j];
    let comb = &s.comb[ri * ch * stride..(ri + 1) * ch * stride];
    for j0 in (0..ch).step_by(BLOCK) {
        let j1 = (j0 + BLOCK).min(ch);
        for v in (0..tv).step_by(8) {
            // SAFETY: comb rows hold `stride` ≥ v + 8 floats; `out.contracted` and `out.comb_sq` rows hold
            // P ≥ p0 + v + 8.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); K];
                let mut sq = _mm256_setzero_ps();
                for j in j0..j1 {
                    let y = _mm256_loadu_ps(comb.as_ptr().add(j * stride + v));
                    if squares {
                        sq = _mm256_fmadd_ps(y, y, sq);
                    }
                    for (o, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(_mm256_set1_ps(wv(o, j)), y, *a);
                    }
                }
                let cp = out.contracted;
                for (o, a) in acc.into_iter().enumerate() {
                    add_f64(cp.add((ri * kk + o0 + o) * p + p0 + v), a);
                }
                if squares {
                    add_f64(out.comb_sq.add(ri * p + p0 + v), sq);
                }
            }
        }
        for v in tv..tl {
            let mut acc = [0f32; K];
            let mut sq = 0f32;
            for j in j0..j1 {
                let y = comb[j * stride + v];
                sq += y * y;
                for (o, a) in acc.iter_mut().enumerate() {
                    *a += wv(o, j) * y;
                }
            }
            // SAFETY: `out.contracted` ([2, kk, P]) and `out.comb_sq` ([2, P]) rows hold P > p0 + v.
            unsafe {
                for (o, a) in acc.into_iter().enumerate() {
                    *out.contracted.add((ri * kk + o0 + o) * p + p0 + v) += a as f64;
                }
                if squares {
                    *out.comb_sq.add(ri * p + p0 + v) += sq as f64;
                }
            }
        }
    }
}
