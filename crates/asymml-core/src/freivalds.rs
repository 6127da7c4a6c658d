//! The kernels of the Freivalds checks that the trusted runtime makes of an accelerator's conv results
//! (`asymml_trusted::integrity` draws the secret coefficients and decides): one pass over a big tensor per
//! check for every repetition, with f32 partial sums over [`BLOCK`] channels added in f64, compiled for AVX2 +
//! FMA where the CPU has them; and the one-channel convolutions the checks compare against.

use crate::layers::{ChannelMap, Conv2d};
use crate::CoreError;

/// Channels (or planes) accumulated in f32 before a partial sum is added to the f64 total.
pub const BLOCK: usize = 16;
/// f32 accumulators a tiled pass keeps per tile of pixels (512 KiB: they stay in L2 while the tile's rows of
/// every sample and channel stream by).
const TILE_FLOATS: usize = 1 << 17;
/// Floats between consecutive accumulator rows beyond the tile width, so that rows are never a multiple of
/// 4 KiB apart (a load from an address 4 KiB from a pending store waits for it on x86).
const PAD: usize = 16;

/// Geometry of one conv application.
#[derive(Clone, Copy, Debug)]
pub struct Geo {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub m: usize,
    pub k: usize,
    pub s: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Geo {
    pub fn of(conv: &Conv2d, x_shape: &[usize]) -> Result<Geo, CoreError> {
        let &[b, n, h, w] = x_shape else {
            return Err(CoreError::Shape(format!(
                "freivalds: input {x_shape:?} is not [B, N, H, W]"
            )));
        };
        let out = conv.out_shape(x_shape)?;
        Ok(Geo {
            b,
            n,
            h,
            w,
            m: conv.out_ch,
            k: conv.k,
            s: conv.stride,
            pad: conv.pad,
            oh: out[2],
            ow: out[3],
        })
    }

    pub fn hw(&self) -> usize {
        self.h * self.w
    }

    pub fn p(&self) -> usize {
        self.oh * self.ow
    }

    /// The output columns ox whose input column ox·s + kx − pad lies in [0, w).
    pub fn cols(&self, kx: usize) -> (usize, usize) {
        let lo = if self.pad > kx {
            (self.pad - kx).div_ceil(self.s)
        } else {
            0
        };
        let hi = if self.w + self.pad > kx {
            ((self.w + self.pad - kx - 1) / self.s + 1).min(self.ow)
        } else {
            0
        };
        (lo, hi.max(lo))
    }

    /// The input row of output row oy at kernel row ky, if inside.
    pub fn row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.s + ky)
            .checked_sub(self.pad)
            .filter(|&iy| iy < self.h)
    }
}

/// What one pass over a tensor `data` [B, C, P] collects for R repetitions ([`combine_pass`]); kept and
/// reused between checks (no allocation once the shapes are seen).
#[derive(Clone, Debug, Default)]
pub struct Combined {
    /// With batch coefficients c ([R, B]) and contraction weights w ([R, k·k, C]): per repetition and offset
    /// o, Σ_ch w[o, ch]·(Σ_b c_b data[b, ch]) at every pixel ([R, k·k, P]). The batch combination itself is
    /// only ever held one tile at a time.
    pub contracted: Vec<f64>,
    /// With batch coefficients: Σ_ch (Σ_b c_b data[b, ch])² per repetition and pixel ([R, P]).
    pub comb_sq: Vec<f64>,
    /// Σ_ch data[b, ch]² per sample and pixel ([B, P]).
    pub bsq: Vec<f64>,
    /// With channel coefficients t ([R, C]): Σ_ch t_ch data[b, ch] per repetition ([R, B, P]).
    pub proj: Vec<f64>,
    /// With channel coefficients: Σ_b Σ_p data[b, ch, p]² per channel ([C]).
    pub chn2: Vec<f64>,
}

impl Combined {
    /// Σ_b c_b² Σ_ch data[b, ch]² per pixel, for one repetition's c ([B]).
    pub fn weighted_bsq(&self, c: &[f64], p: usize) -> Vec<f64> {
        let mut out = vec![0f64; p];
        for (&cb, row) in c.iter().zip(self.bsq.chunks_exact(p.max(1))) {
            let c2 = cb * cb;
            out.iter_mut().zip(row).for_each(|(a, &v)| *a += c2 * v);
        }
        out
    }
}

/// The left-hand sides of one check for R repetitions ([`lhs_pass`]): Σ_b Σ_ch k[b, ch]·data[b, ch] and
/// Σ (k·data)² per pixel ([R, P] each).
#[derive(Clone, Debug, Default)]
pub struct Lhs {
    pub lhs: Vec<f64>,
    pub sq: Vec<f64>,
}

/// Zeroes `v` at length `n`, reusing its allocation.
fn zeroed<T: Copy + Default>(v: &mut Vec<T>, n: usize) {
    v.clear();
    v.resize(n, T::default());
}

/// Pixels per tile of a pass: `acc` f32 accumulators per pixel stay within [`TILE_FLOATS`].
fn tile_width(acc: usize, p: usize) -> usize {
    ((TILE_FLOATS / acc.max(1)) / 16 * 16)
        .clamp(16, 4096)
        .min(p)
        .max(1)
}

/// One pass over `data` ([B, C, P]), tile of pixels by tile, collecting [`Combined`] for `r` repetitions:
/// the batch combinations with `batch` ([R, B]), contracted over channels with `contract` ([R, kk, C]) while
/// the tile is in cache, and the channel projections with `chan` ([R, C]). Partial sums over [`BLOCK`]
/// channels are taken in f32 and added in f64. Two repetitions run in AVX2 registers where the CPU has them.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn combine_pass(
    data: &[f32],
    bsz: usize,
    ch: usize,
    p: usize,
    r: usize,
    batch: Option<(&[f64], &[f32], usize)>,
    chan: Option<&[f64]>,
    out: &mut Combined,
) {
    combine_with(data, bsz, ch, (p, 0, p), r, batch, chan, out, true)
}

/// [`combine_pass`] over pixels `q0 .. q0 + p` of `data` ([B, C, DP]: rows of `dp` pixels), its outputs
/// sized for those `p` pixels (a band of a map, whose check needs only the band's sums at once).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn combine_pass_range(
    data: &[f32],
    bsz: usize,
    ch: usize,
    (dp, q0, p): (usize, usize, usize),
    r: usize,
    batch: Option<(&[f64], &[f32], usize)>,
    chan: Option<&[f64]>,
    out: &mut Combined,
) {
    combine_with(data, bsz, ch, (dp, q0, p), r, batch, chan, out, true)
}

#[cfg(target_arch = "x86_64")]
#[path = "freivalds_combine_x86.rs"]
mod combine_x86;

simd_fn! {
/// [`combine_pass`]; with `fast`, two repetitions go to the AVX2 kernel when the CPU has it (without, the
/// generic loops run: the tests compare both).
fn combine_with(
    data: &[f32],
    bsz: usize,
    ch: usize,
    range: (usize, usize, usize),
    r: usize,
    batch: Option<(&[f64], &[f32], usize)>,
    chan: Option<&[f64]>,
    out: &mut Combined,
    fast: bool,
) {
    let (dp, q0, p) = range;
    assert!(
        data.len() == bsz * ch * dp && q0 + p <= dp,
        "combine_pass: data is not [B, C, P] or the pixels are not in its rows"
    );
    let kk = batch.map_or(0, |(_, _, kk)| kk);
    if let Some((c, w, kk)) = batch {
        assert!(c.len() == r * bsz && w.len() == r * kk * ch, "combine_pass: coefficient sizes");
    }
    zeroed(&mut out.contracted, r * kk * p);
    zeroed(&mut out.comb_sq, if batch.is_some() { r * p } else { 0 });
    zeroed(&mut out.bsq, bsz * p);
    zeroed(&mut out.proj, if chan.is_some() { r * bsz * p } else { 0 });
    zeroed(&mut out.chn2, if chan.is_some() { ch } else { 0 });
    if data.is_empty() || p == 0 {
        return;
    }
    // Per tile of pixels, the R·C rows of the batch combination stay in L2 while every sample's rows of the
    // tile stream by; the per-sample squares and projections, and the contraction's partial sums, in L1.
    let tile = tile_width(if batch.is_some() { r * ch } else { 1 }, p);
    #[cfg(target_arch = "x86_64")]
    if fast && r == 2 && combine_x86::combine_r2(data, bsz, ch, (dp, q0, p), batch, chan, tile, out) {
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = fast;
    // Accumulator rows `stride` floats apart (not a multiple of 4 KiB: see [`PAD`]).
    let stride = tile + PAD;
    let mut comb = vec![0f32; if batch.is_some() { r * ch * stride } else { 0 }];
    let mut part = vec![0f32; r.max(kk) * stride];
    let mut sq = vec![0f32; tile];
    for p0 in (0..p).step_by(tile) {
        let tl = tile.min(p - p0);
        comb.iter_mut().for_each(|v| *v = 0.0);
        for b in 0..bsz {
            sq.iter_mut().for_each(|v| *v = 0.0);
            for j0 in (0..ch).step_by(BLOCK) {
                if chan.is_some() {
                    part.iter_mut().for_each(|v| *v = 0.0);
                }
                for j in j0..(j0 + BLOCK).min(ch) {
                    let x = &data[(b * ch + j) * dp + q0 + p0..][..tl];
                    if let Some((c, _, _)) = batch {
                        for ri in 0..r {
                            let cb = c[ri * bsz + b] as f32;
                            let dst = &mut comb[(ri * ch + j) * stride..][..tl];
                            dst.iter_mut().zip(x).for_each(|(a, &v)| *a += cb * v);
                        }
                    }
                    if let Some(t) = chan {
                        for ri in 0..r {
                            let tj = t[ri * ch + j] as f32;
                            let dst = &mut part[ri * stride..][..tl];
                            dst.iter_mut().zip(x).for_each(|(a, &v)| *a += tj * v);
                        }
                    }
                    sq.iter_mut().zip(x).for_each(|(a, &v)| *a += v * v);
                    if chan.is_some() {
                        out.chn2[j] += sumsq_lanes(x);
                    }
                }
                if chan.is_some() {
                    for ri in 0..r {
                        let dst = &mut out.proj[(ri * bsz + b) * p + p0..][..tl];
                        dst.iter_mut()
                            .zip(&part[ri * stride..][..tl])
                            .for_each(|(a, &v)| *a += v as f64);
                    }
                }
            }
            out.bsq[b * p + p0..][..tl]
                .iter_mut()
                .zip(&sq)
                .for_each(|(a, &v)| *a = v as f64);
        }
        if let Some((_, w, kk)) = batch {
            for ri in 0..r {
                let dst = &mut out.comb_sq[ri * p + p0..][..tl];
                for j in 0..ch {
                    let src = &comb[(ri * ch + j) * stride..][..tl];
                    dst.iter_mut()
                        .zip(src)
                        .for_each(|(a, &v)| *a += (v as f64) * (v as f64));
                }
                // Σ_ch w[o, ch]·comb[ch] for every offset o, BLOCK channels at a time in f32.
                for j0 in (0..ch).step_by(BLOCK) {
                    part.iter_mut().for_each(|v| *v = 0.0);
                    for j in j0..(j0 + BLOCK).min(ch) {
                        let src = &comb[(ri * ch + j) * stride..][..tl];
                        for o in 0..kk {
                            let wv = w[(ri * kk + o) * ch + j];
                            let dst = &mut part[o * stride..][..tl];
                            dst.iter_mut().zip(src).for_each(|(a, &v)| *a += wv * v);
                        }
                    }
                    for o in 0..kk {
                        let dst = &mut out.contracted[(ri * kk + o) * p + p0..][..tl];
                        dst.iter_mut()
                            .zip(&part[o * stride..][..tl])
                            .for_each(|(a, &v)| *a += v as f64);
                    }
                }
            }
        }
    }
}
}

/// The left-hand sides of two repetitions ([`lhs_pass`] with R = 2) in AVX2 registers: per 8 pixels, the four
/// f32 sums (Σ k·x and Σ k²·x² per repetition) run over a block of [`BLOCK`] channels before they are added in
/// f64 — a load and five multiply-adds per 8 values instead of keeping the sums in memory.
#[cfg(target_arch = "x86_64")]
mod lhs_x86 {
    use super::BLOCK;
    use crate::layers::ChannelMap;
    use std::arch::x86_64::*;

    /// What the pass does with the values besides its sums.
    #[derive(Clone, Copy)]
    pub(super) enum Merge<'a> {
        /// Nothing: the values are only read.
        No,
        /// Adds this (as many values) to the values in place, after reading them.
        InPlace(&'a [f32]),
        /// Adds the values into the `len` f32 at this pointer (aligned, apart from the values), then applies the
        /// channel map where there is one (row b·C + j is channel j's).
        Into(*mut f32, Option<ChannelMap<'a>>),
    }

    /// Adds `lhs` and `sq` ([2, P] each) for pixels `q0 .. q0 + P` of the `len` values at `data` ([B, C, DP]:
    /// rows of `dp` pixels) with the coefficients `k` ([2, B, C]), and merges those values as `merge` says. False
    /// (nothing done) without AVX2 and FMA.
    ///
    /// # Safety
    /// `data` points to `len` = B·C·DP initialised values, valid for reads (aligned to 4 unless `merge` is
    /// `Into`: then they may lie anywhere), and for writes with `InPlace`; with `Into`, its pointer is to `len`
    /// initialised, aligned values valid for reads and writes, not overlapping `data`; nothing else reads or
    /// writes either meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn lhs_r2(
        data: *mut f32,
        len: usize,
        merge: Merge<'_>,
        bsz: usize,
        ch: usize,
        (dp, q0, p): (usize, usize, usize),
        k: &[f64],
        lhs: &mut [f64],
        sq: &mut [f64],
    ) -> bool {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return false;
        }
        assert!(
            len == bsz * ch * dp
                && q0 + p <= dp
                && k.len() == 2 * bsz * ch
                && lhs.len() == 2 * p
                && sq.len() == 2 * p
                && !matches!(merge, Merge::InPlace(a) if a.len() != len),
            "lhs_r2: sizes"
        );
        // Per (sample, channel): k and k² of both repetitions, in f32.
        let kf: Vec<[f32; 4]> = (0..bsz * ch)
            .map(|i| {
                let (a, b) = (k[i] as f32, k[bsz * ch + i] as f32);
                [a, a * a, b, b * b]
            })
            .collect();
        // The first p − p mod 8 pixels, tile by tile: every tile's values and sums are its own, so the tiles
        // run on the worker threads (rayon's current pool) once there is enough to share.
        let p8 = p / 8 * 8;
        let threads = rayon::current_num_threads();
        let par = threads > 1 && bsz * ch * p >= PAR_MIN_VALUES;
        let tile = if par {
            (p8 / (4 * threads) / 8 * 8).clamp(64, TILE)
        } else {
            TILE
        };
        let at = Shared {
            d: data,
            into: match merge {
                Merge::Into(dst, _) => dst,
                _ => std::ptr::null_mut(),
            },
            lhs: lhs.as_mut_ptr(),
            sq: sq.as_mut_ptr(),
        };
        let tiles = p8.div_ceil(tile);
        let run = |t: usize| {
            let p0 = t * tile;
            // SAFETY: AVX2 and FMA were detected above; `main`'s pointer arithmetic stays inside the `len`
            // values and the [2, P] sums (see its comment), which the caller vouches for. Tiles cover disjoint
            // pixel columns, so no two calls touch the same value, sum or merged output.
            unsafe { main(at, merge, bsz, ch, (dp, q0, p), &kf, p0, tile.min(p8 - p0)) }
        };
        if par && tiles > 1 {
            use rayon::prelude::*;
            (0..tiles).into_par_iter().for_each(run);
        } else {
            (0..tiles).for_each(run);
        }
        // The last p mod 8 pixels, in f64.
        for b in 0..bsz {
            for j in 0..ch {
                let kv = kf[b * ch + j];
                for i in p8..p {
                    let off = (b * ch + j) * dp + q0 + i;
                    // SAFETY: off < B·C·DP = len (read unaligned: with `Into` the values may lie anywhere).
                    let x = unsafe { data.add(off).read_unaligned() };
                    match merge {
                        // SAFETY: as above; the caller allows writes with `InPlace`.
                        Merge::InPlace(a) => unsafe { *data.add(off) = x + a[off] },
                        // SAFETY: `dst` holds `len` aligned values apart from `data` (the caller's contract).
                        Merge::Into(dst, map) => unsafe {
                            let v = *dst.add(off) + x;
                            *dst.add(off) = map.map_or(v, |m| m.apply(j, v));
                        },
                        Merge::No => {}
                    }
                    let (x64, xx) = (x as f64, (x as f64) * (x as f64));
                    lhs[i] += kv[0] as f64 * x64;
                    sq[i] += kv[1] as f64 * xx;
                    lhs[p + i] += kv[2] as f64 * x64;
                    sq[p + i] += kv[3] as f64 * xx;
                }
            }
        }
        true
    }

    /// Most pixels per tile.
    const TILE: usize = 1024;
    /// Floats ahead of the vector at hand that each row is prefetched (see [`super::combine_x86`]).
    const PF: usize = 128;
    /// Below this many values the tiles run on the calling thread.
    const PAR_MIN_VALUES: usize = 1 << 20;

    /// The pointers of one pass, shared by the tiles that run on several threads.
    #[derive(Clone, Copy)]
    struct Shared {
        /// The values ([B, C, P]).
        d: *mut f32,
        /// With `Merge::Into`, the destination ([B, C, P]); else null.
        into: *mut f32,
        /// The sums ([2, P] each).
        lhs: *mut f64,
        sq: *mut f64,
    }
    // SAFETY: the tiles that share a `Shared` touch disjoint pixel columns of each buffer (see `main`), and the
    // caller of `lhs_r2` keeps every buffer alive and otherwise untouched until they are done.
    unsafe impl Send for Shared {}
    // SAFETY: as for `Send`.
    unsafe impl Sync for Shared {}
    // SAFETY: `Into`'s pointer is written only through `Shared::into` by tiles of disjoint pixel columns (see
    // `main`); the caller of `lhs_r2` keeps it alive and otherwise untouched until they are done.
    unsafe impl Sync for Merge<'_> {}

    /// The tile of pixels `p0 .. p0 + tl` of the band (p0 + tl ≤ p − p mod 8, tl a multiple of 8). Every
    /// vector access is at `(b·C + j)·DP + q0 + p0 + v` with q0 + p0 + v + 8 ≤ q0 + P ≤ DP, so inside the
    /// B·C·DP values at `d` (and `addend` or `into`: the same length); the f64 rows at `p0 + v` and
    /// `P + p0 + v`, 8 wide, inside the [2, P] sums. Only columns q0 + p0 .. q0 + p0 + tl of the values and
    /// p0 .. p0 + tl of the sums are touched.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn main(
        at: Shared,
        merge: Merge<'_>,
        bsz: usize,
        ch: usize,
        (dp, q0, p): (usize, usize, usize),
        kf: &[[f32; 4]],
        p0: usize,
        tl: usize,
    ) {
        let d = at.d;
        for b in 0..bsz {
            for j0 in (0..ch).step_by(BLOCK) {
                let j1 = (j0 + BLOCK).min(ch);
                for v in (0..tl).step_by(8) {
                    let mut acc = [_mm256_setzero_ps(); 4];
                    for j in j0..j1 {
                        let off = (b * ch + j) * dp + q0 + p0 + v;
                        if v % 16 == 0 {
                            _mm_prefetch::<_MM_HINT_T0>(d.wrapping_add(off + PF).cast::<i8>());
                            if let Merge::Into(..) = merge {
                                _mm_prefetch::<_MM_HINT_T0>(
                                    at.into.wrapping_add(off + PF).cast::<i8>(),
                                );
                            }
                        }
                        // SAFETY: off + 8 ≤ (b·C + j + 1)·DP ≤ B·C·DP (see the function's comment).
                        let x = unsafe { _mm256_loadu_ps(d.add(off)) };
                        if let Merge::Into(_, map) = merge {
                            // The sum takes the very value the check's sums take: one read of each received
                            // value (its frame may be memory the accelerator can still write).
                            // SAFETY: the destination holds `len` values too (the caller's contract).
                            unsafe {
                                let o = at.into.add(off);
                                let mut y = _mm256_add_ps(_mm256_loadu_ps(o), x);
                                if let Some(m) = map {
                                    // BatchNorm's arithmetic: a product and a sum, each rounded.
                                    let a = _mm256_set1_ps(m.scale[j]);
                                    y = _mm256_add_ps(
                                        _mm256_mul_ps(y, a),
                                        _mm256_set1_ps(m.shift[j]),
                                    );
                                    if m.relu {
                                        y = _mm256_max_ps(y, _mm256_setzero_ps());
                                    }
                                }
                                _mm256_storeu_ps(o, y);
                            }
                        }
                        let kv = &kf[b * ch + j];
                        let xx = _mm256_mul_ps(x, x);
                        acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(kv[0]), x, acc[0]);
                        acc[1] = _mm256_fmadd_ps(_mm256_set1_ps(kv[1]), xx, acc[1]);
                        acc[2] = _mm256_fmadd_ps(_mm256_set1_ps(kv[2]), x, acc[2]);
                        acc[3] = _mm256_fmadd_ps(_mm256_set1_ps(kv[3]), xx, acc[3]);
                    }
                    for (q, a) in acc.into_iter().enumerate() {
                        let row = (q / 2) * p + p0 + v;
                        let dst = if q % 2 == 0 { at.lhs } else { at.sq };
                        let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(a));
                        let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(a));
                        // SAFETY: row + 8 ≤ P + p0 + tl ≤ 2P, inside the [2, P] sums.
                        unsafe {
                            let o = dst.add(row);
                            _mm256_storeu_pd(o, _mm256_add_pd(_mm256_loadu_pd(o), lo));
                            _mm256_storeu_pd(
                                o.add(4),
                                _mm256_add_pd(_mm256_loadu_pd(o.add(4)), hi),
                            );
                        }
                    }
                }
                // The in-place merge, row by row, once the sums have read the block's rows (now in cache).
                let Merge::InPlace(a) = merge else { continue };
                for j in j0..j1 {
                    let off = (b * ch + j) * dp + q0 + p0;
                    for v in (0..tl).step_by(8) {
                        // SAFETY: off + v + 8 ≤ (b·C + j + 1)·DP ≤ B·C·DP, in `d` and in `addend` (the same
                        // length); writes to `d` are allowed with `InPlace`.
                        unsafe {
                            let x = _mm256_loadu_ps(d.add(off + v));
                            let y = _mm256_add_ps(x, _mm256_loadu_ps(a.as_ptr().add(off + v)));
                            _mm256_storeu_ps(d.add(off + v), y);
                        }
                    }
                }
            }
        }
    }
}

/// Checks [`lhs_pass_range`]'s sizes and zeroes its output.
fn lhs_start(
    len: usize,
    bsz: usize,
    ch: usize,
    px: (usize, usize, usize),
    r: usize,
    k: &[f64],
    out: &mut Lhs,
) {
    let (dp, q0, p) = px;
    assert_eq!(len, bsz * ch * dp, "lhs_pass: data is not [B, C, DP]");
    assert!(q0 + p <= dp, "lhs_pass: pixels {q0}..{} of {dp}", q0 + p);
    assert_eq!(k.len(), r * bsz * ch, "lhs_pass: k is not [R, B, C]");
    zeroed(&mut out.lhs, r * p);
    zeroed(&mut out.sq, r * p);
}

/// [`lhs_pass`] in portable loops (any R; the tests compare it with the AVX2 kernel).
fn lhs_generic(
    data: &[f32],
    bsz: usize,
    ch: usize,
    px: (usize, usize, usize),
    r: usize,
    k: &[f64],
    out: &mut Lhs,
) {
    let (dp, q0, p) = px;
    // 2R f32 accumulators per pixel, kept in L1.
    let tile = 1024.min(p);
    // The 2R accumulator rows `stride` floats apart: rows a multiple of 4 KiB apart would make every load
    // of one row wait on the store to the other (4K aliasing).
    let stride = tile + PAD;
    let mut scratch = vec![0f32; 2 * r * stride];
    let (part, psq) = scratch.split_at_mut(r * stride);
    for p0 in (0..p).step_by(tile.max(1)) {
        let tl = tile.min(p - p0);
        for b in 0..bsz {
            for j0 in (0..ch).step_by(BLOCK) {
                part.iter_mut().for_each(|v| *v = 0.0);
                psq.iter_mut().for_each(|v| *v = 0.0);
                for j in j0..(j0 + BLOCK).min(ch) {
                    let x = &data[(b * ch + j) * dp + q0 + p0..][..tl];
                    for ri in 0..r {
                        let kv = k[(ri * bsz + b) * ch + j] as f32;
                        let k2 = kv * kv;
                        let (pa, ps) = (
                            &mut part[ri * stride..][..tl],
                            &mut psq[ri * stride..][..tl],
                        );
                        for ((a, s), &v) in pa.iter_mut().zip(ps.iter_mut()).zip(x) {
                            *a += kv * v;
                            *s += k2 * (v * v);
                        }
                    }
                }
                for ri in 0..r {
                    let (l, s) = (
                        &mut out.lhs[ri * p + p0..][..tl],
                        &mut out.sq[ri * p + p0..][..tl],
                    );
                    for ((l, s), (&a, &q)) in l.iter_mut().zip(s.iter_mut()).zip(
                        part[ri * stride..][..tl]
                            .iter()
                            .zip(&psq[ri * stride..][..tl]),
                    ) {
                        *l += a as f64;
                        *s += q as f64;
                    }
                }
            }
        }
    }
}

/// One pass over `data` ([B, C, P]) with the coefficient products `k` ([R, B, C]), into `out` ([`Lhs`]):
/// partial sums over [`BLOCK`] channels in f32, added in f64.
pub fn lhs_pass(data: &[f32], bsz: usize, ch: usize, p: usize, r: usize, k: &[f64], out: &mut Lhs) {
    lhs_pass_range(data, bsz, ch, (p, 0, p), r, k, out)
}

/// [`lhs_pass`] and, in the same pass, `data` += `addend`: the merge of a checked result with the trusted
/// part, in the result's own buffer (the sums see the values as they came).
#[allow(clippy::too_many_arguments)]
pub fn merge_lhs_pass(
    data: &mut [f32],
    addend: &[f32],
    bsz: usize,
    ch: usize,
    p: usize,
    r: usize,
    k: &[f64],
    out: &mut Lhs,
) {
    merge_lhs_pass_range(data, addend, bsz, ch, (p, 0, p), r, k, out)
}

/// [`lhs_pass`] of received values `src` ([B, C, P] little-endian f32 words, as a frame holds them: any
/// alignment) and, in the same pass, `dst` += them: the merge of a checked result into the trusted part's own
/// buffer, with no copy of the received values. Each value is read once, and that one reading feeds both the
/// check's sums and the merge: a frame the accelerator could still write cannot show the check one value and
/// the sum another.
#[allow(clippy::too_many_arguments)]
pub fn merge_into_lhs_pass(
    src: &[[u8; 4]],
    dst: &mut [f32],
    bsz: usize,
    ch: usize,
    p: usize,
    r: usize,
    k: &[f64],
    out: &mut Lhs,
) {
    merge_into_lhs_pass_range(src, dst, bsz, ch, (p, 0, p), r, k, out, None)
}

/// The values of pixels `q0 .. q0 + P` of every row of `data` ([rows, DP]), as [rows, P].
fn band_of<T: Copy>(
    data: &[T],
    (dp, q0, p): (usize, usize, usize),
    f: impl Fn(T) -> f32,
) -> Vec<f32> {
    data.chunks_exact(dp.max(1))
        .flat_map(|row| row[q0..q0 + p].iter().map(|&v| f(v)))
        .collect()
}

simd_fn! {
/// [`lhs_pass`] over pixels `q0 .. q0 + P` of `data` ([B, C, DP]: rows of `dp` pixels), `out` sized for those
/// `P` pixels ([R, P] each): a band of a map, whose check then needs only the band's sums at once.
pub fn lhs_pass_range(data: &[f32], bsz: usize, ch: usize, px: (usize, usize, usize), r: usize, k: &[f64], out: &mut Lhs) {
    lhs_start(data.len(), bsz, ch, px, r, k, out);
    #[cfg(target_arch = "x86_64")]
    if r == 2 && !data.is_empty() {
        // SAFETY: `data` is a live shared slice of `data.len()` values, only read (no addend).
        let done = unsafe {
            lhs_x86::lhs_r2(data.as_ptr().cast_mut(), data.len(), lhs_x86::Merge::No, bsz, ch, px, k, &mut out.lhs, &mut out.sq)
        };
        if done {
            return;
        }
    }
    lhs_generic(data, bsz, ch, px, r, k, out)
}
}

simd_fn! {
/// [`merge_lhs_pass`] over pixels `q0 .. q0 + P` of `data` and `addend` ([B, C, DP] each), as
/// [`lhs_pass_range`]: only those pixels' values are merged.
pub fn merge_lhs_pass_range(
    data: &mut [f32],
    addend: &[f32],
    bsz: usize,
    ch: usize,
    px: (usize, usize, usize),
    r: usize,
    k: &[f64],
    out: &mut Lhs,
) {
    lhs_start(data.len(), bsz, ch, px, r, k, out);
    assert_eq!(addend.len(), data.len(), "merge_lhs_pass: addend's size");
    #[cfg(target_arch = "x86_64")]
    if r == 2 && !data.is_empty() {
        // SAFETY: `data` is an exclusive slice of `data.len()` values, read and written only by the kernel.
        let done = unsafe {
            lhs_x86::lhs_r2(data.as_mut_ptr(), data.len(), lhs_x86::Merge::InPlace(addend), bsz, ch, px, k, &mut out.lhs, &mut out.sq)
        };
        if done {
            return;
        }
    }
    lhs_generic(data, bsz, ch, px, r, k, out);
    let (dp, q0, p) = px;
    for (row, add) in data.chunks_exact_mut(dp.max(1)).zip(addend.chunks_exact(dp.max(1))) {
        row[q0..q0 + p].iter_mut().zip(&add[q0..q0 + p]).for_each(|(v, a)| *v += a);
    }
}
}

simd_fn! {
/// [`merge_into_lhs_pass`] over pixels `q0 .. q0 + P` of `src` and `dst` ([B, C, DP] each), as
/// [`lhs_pass_range`]: only those pixels are read and merged. With `map`, each merged value then goes through
/// its channel's map before it is written (BatchNorm in inference, applied in this pass instead of one of its
/// own); the sums are of the received values alone, as without it.
pub fn merge_into_lhs_pass_range(
    src: &[[u8; 4]],
    dst: &mut [f32],
    bsz: usize,
    ch: usize,
    px: (usize, usize, usize),
    r: usize,
    k: &[f64],
    out: &mut Lhs,
    map: Option<ChannelMap<'_>>,
) {
    lhs_start(src.len(), bsz, ch, px, r, k, out);
    assert_eq!(dst.len(), src.len(), "merge_into_lhs_pass: destination's size");
    assert!(
        map.is_none_or(|m| m.channels() >= ch),
        "merge_into_lhs_pass: a channel map of fewer than {ch} channels"
    );
    #[cfg(target_arch = "x86_64")]
    if r == 2 && !src.is_empty() {
        // SAFETY: `src` is a live shared slice of `src.len()` words, only read (x86-64 is little-endian, so each
        // word is its f32; unaligned reads); `dst` an exclusive slice of as many f32, apart from it.
        let done = unsafe {
            lhs_x86::lhs_r2(src.as_ptr().cast::<f32>().cast_mut(), src.len(), lhs_x86::Merge::Into(dst.as_mut_ptr(), map), bsz, ch, px, k, &mut out.lhs, &mut out.sq)
        };
        if done {
            return;
        }
    }
    // The band's values read once, into a buffer of their own: the sums and the merge take the same copy.
    let (dp, q0, p) = px;
    let values = band_of(src, px, f32::from_le_bytes);
    lhs_generic(&values, bsz, ch, (p, 0, p), r, k, out);
    for (i, (row, vals)) in dst.chunks_exact_mut(dp.max(1)).zip(values.chunks_exact(p.max(1))).enumerate() {
        let row = &mut row[q0..q0 + p];
        match map {
            Some(m) => row.iter_mut().zip(vals).for_each(|(d, &v)| *d = m.apply(i % ch, *d + v)),
            None => row.iter_mut().zip(vals).for_each(|(d, v)| *d += v),
        }
    }
}
}

/// Σ v² in f64, from eight f32 lanes (a sum of squares loses nothing to cancellation).
#[inline(always)]
fn sumsq_lanes(x: &[f32]) -> f64 {
    let mut acc = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let tail: f64 = it
        .remainder()
        .iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum();
    acc.iter().map(|&a| a as f64).sum::<f64>() + tail
}

simd_fn! {
/// Σ v² in f64.
pub fn sum_squares(x: &[f32]) -> f64 {
    sumsq_lanes(x)
}
}

/// Σ a_i·b_i in f64 over four lanes (independent accumulators, so it runs at throughput, not latency), of f64
/// values and f64 or f32 ones.
#[inline(always)]
fn dot64_of<T: Copy + Into<f64>>(a: &[f64], b: &[T]) -> f64 {
    let mut acc = [0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, &y)| x * y.into())
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..4 {
            acc[l] += x[l] * y[l].into();
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[inline(always)]
pub(crate) fn dot64(a: &[f64], b: &[f64]) -> f64 {
    dot64_of(a, b)
}

simd_fn! {
/// out ([R, cols], f64) += Σ_m coef[ri, m]·rows[m] for the `r` repetitions' coefficients `coef` ([R, M]) and
/// `rows` ([M, cols], f32): one read of the rows for every repetition, in blocks of columns whose sums stay in
/// L1.
pub fn combine_rows(rows: &[f32], m: usize, cols: usize, coef: &[f64], r: usize, out: &mut [f64]) {
    const COLS: usize = 512;
    assert!(
        rows.len() == m * cols && coef.len() == r * m && out.len() == r * cols,
        "combine_rows: sizes"
    );
    for c0 in (0..cols).step_by(COLS) {
        let cl = COLS.min(cols - c0);
        for (mi, row) in rows.chunks_exact(cols).enumerate() {
            let row = &row[c0..c0 + cl];
            for ri in 0..r {
                let cm = coef[ri * m + mi];
                out[ri * cols + c0..][..cl]
                    .iter_mut()
                    .zip(row)
                    .for_each(|(a, &v)| *a += cm * v as f64);
            }
        }
    }
}
}

simd_fn! {
/// out ([cols], f64) += Σ over the rows of `rows` ([M, cols], f32) of their squares.
pub fn column_squares(rows: &[f32], cols: usize, out: &mut [f64]) {
    assert!(out.len() == cols && rows.len().is_multiple_of(cols.max(1)), "column_squares: sizes");
    for row in rows.chunks_exact(cols.max(1)) {
        out.iter_mut()
            .zip(row)
            .for_each(|(a, &v)| *a += (v as f64) * (v as f64));
    }
}
}

/// out[o] += Σ_j tk[j·kk + o]·f(row[j·kk + o]) for every offset o < kk, in f64, with f(x) = x, or x² with
/// `square`: a weighted sum over the rows j of a [J, kk] matrix, computed as sums with a period of 4·kk so that
/// they vectorise (a loop over each row's kk values does not). `tk` holds each row's weight repeated kk times.
pub fn period_dot(row: &[f32], tk: &[f64], kk: usize, square: bool, out: &mut [f64]) {
    assert!(
        row.len() == tk.len() && kk >= 1 && row.len().is_multiple_of(kk) && out.len() == kk,
        "period_dot: sizes"
    );
    match kk {
        9 => period_dot_9(row, tk, square, out),
        1 => period_dot_1(row, tk, square, out),
        _ => {
            for (r, t) in row.chunks_exact(kk).zip(tk.chunks_exact(kk)) {
                for ((o, &v), &tv) in out.iter_mut().zip(r).zip(t) {
                    let v = v as f64;
                    *o += tv * if square { v * v } else { v };
                }
            }
        }
    }
}

simd_fn! {
/// [`period_dot`] for 3×3 kernels.
fn period_dot_9(row: &[f32], tk: &[f64], square: bool, out: &mut [f64]) {
    period_dot_k::<9, 36>(row, tk, square, out)
}
}

simd_fn! {
/// [`period_dot`] for 1×1 kernels.
fn period_dot_1(row: &[f32], tk: &[f64], square: bool, out: &mut [f64]) {
    period_dot_k::<1, 4>(row, tk, square, out)
}
}

/// [`period_dot`] for kk = K, with P = 4·K sums in flight.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn period_dot_k<const K: usize, const P: usize>(
    row: &[f32],
    tk: &[f64],
    square: bool,
    out: &mut [f64],
) {
    let mut acc = [0f64; P];
    let (rc, tc) = (row.chunks_exact(P), tk.chunks_exact(P));
    let (rr, tr) = (rc.remainder(), tc.remainder());
    for (r, t) in rc.zip(tc) {
        if square {
            for q in 0..P {
                let v = r[q] as f64;
                acc[q] += t[q] * (v * v);
            }
        } else {
            for q in 0..P {
                acc[q] += t[q] * r[q] as f64;
            }
        }
    }
    for (q, (&v, &t)) in rr.iter().zip(tr).enumerate() {
        let v = v as f64;
        acc[q] += t * if square { v * v } else { v };
    }
    for (q, a) in acc.iter().enumerate() {
        out[q % K] += a;
    }
}

simd_fn! {
/// rhs [k·k] += per kernel offset, Σ_b Σ_p dys[b, p] · xt[b, p·s + off − pad] (dys [B, OH·OW], xt
/// [B, H·W]): the correlation of the two projections that ∇W_U's check compares against.
pub fn weight_grad_one(dys: &[f64], xt: &[f32], g: &Geo, rhs: &mut [f64]) {
    weight_grad_rows(dys, xt, g, (0, g.oh), rhs)
}
}

simd_fn! {
/// [`weight_grad_one`] over the output rows `oy0 .. oy1` only, `dys` holding those rows ([B, (oy1 − oy0)·OW]):
/// the bands of a map add up to the whole map's.
pub fn weight_grad_rows(dys: &[f64], xt: &[f32], g: &Geo, rows: (usize, usize), rhs: &mut [f64]) {
    let (oy0, oy1) = rows;
    let (hw, p) = (g.hw(), (oy1 - oy0) * g.ow);
    if hw == 0 || p == 0 {
        return;
    }
    for (dsb, xtb) in dys.chunks_exact(p).zip(xt.chunks_exact(hw)) {
        for ky in 0..g.k {
            for kx in 0..g.k {
                let (lo, hi) = g.cols(kx);
                if lo >= hi {
                    continue;
                }
                let mut acc = 0f64;
                for oy in oy0..oy1 {
                    let Some(iy) = g.row(oy, ky) else { continue };
                    let drow = &dsb[(oy - oy0) * g.ow..(oy - oy0 + 1) * g.ow];
                    let xrow = &xtb[iy * g.w..(iy + 1) * g.w];
                    if g.s == 1 {
                        let start = lo + kx - g.pad;
                        acc += dot64_of(&drow[lo..hi], &xrow[start..start + hi - lo]);
                    } else {
                        for ox in lo..hi {
                            acc += drow[ox] * xrow[ox * g.s + kx - g.pad] as f64;
                        }
                    }
                }
                rhs[ky * g.k + kx] += acc;
            }
        }
    }
}
}

simd_fn! {
/// z [OH·OW] += Σ over kernel offsets o of a[o] ([k·k, H·W]) at the input pixel that o maps output pixel p to:
/// with a[o] = Σ_ch w[ch, o]·x[ch] (see [`Combined::contracted`]), the conv of x with the one output channel w.
pub fn gather_offsets(a: &[f64], g: &Geo, z: &mut [f64]) {
    gather_offsets_rows(a, (g.hw(), 0), g, (0, g.oh), z)
}
}

simd_fn! {
/// [`gather_offsets`] for the output rows `oy0 .. oy1` (into z [(oy1 − oy0)·OW]) from a window of the input
/// rows: `a` holds [k·k, WIN] with WIN = `win` pixels from input row `row0` on, which must cover every input
/// row those output rows read.
pub fn gather_offsets_rows(
    a: &[f64],
    window: (usize, usize),
    g: &Geo,
    rows: (usize, usize),
    z: &mut [f64],
) {
    let (win, row0) = window;
    let (oy0, oy1) = rows;
    for oy in oy0..oy1 {
        let zrow = &mut z[(oy - oy0) * g.ow..(oy - oy0 + 1) * g.ow];
        for ky in 0..g.k {
            let Some(iy) = g.row(oy, ky) else { continue };
            for kx in 0..g.k {
                let (lo, hi) = g.cols(kx);
                if lo >= hi {
                    continue;
                }
                let row = &a[(ky * g.k + kx) * win + (iy - row0) * g.w..][..g.w];
                if g.s == 1 {
                    let start = lo + kx - g.pad;
                    zrow[lo..hi]
                        .iter_mut()
                        .zip(&row[start..start + hi - lo])
                        .for_each(|(z, &v)| *z += v);
                } else {
                    for ox in lo..hi {
                        zrow[ox] += row[ox * g.s + kx - g.pad];
                    }
                }
            }
        }
    }
}
}

simd_fn! {
/// rhs [H·W] += Σ over kernel offsets o of a[o] ([k·k, OH·OW]) scattered to the input pixel o maps each
/// output pixel to: with a[o] = Σ_m w[m, o]·dy[m], the transposed conv of dy with the one input channel w.
pub fn scatter_offsets(a: &[f64], g: &Geo, rhs: &mut [f64]) {
    scatter_offsets_rows(a, g, (0, g.oh), rhs)
}
}

simd_fn! {
/// [`scatter_offsets`] for the output rows `oy0 .. oy1` only, `a` holding those rows ([k·k, (oy1 − oy0)·OW]):
/// the bands of a map, scattered one after the other, add up to the whole map's.
pub fn scatter_offsets_rows(a: &[f64], g: &Geo, rows: (usize, usize), rhs: &mut [f64]) {
    let (oy0, oy1) = rows;
    let p = (oy1 - oy0) * g.ow;
    for oy in oy0..oy1 {
        for ky in 0..g.k {
            let Some(iy) = g.row(oy, ky) else { continue };
            for kx in 0..g.k {
                let (lo, hi) = g.cols(kx);
                if lo >= hi {
                    continue;
                }
                let src = &a[(ky * g.k + kx) * p + (oy - oy0) * g.ow..][..g.ow];
                let dst = &mut rhs[iy * g.w..(iy + 1) * g.w];
                if g.s == 1 {
                    let start = lo + kx - g.pad;
                    dst[start..start + hi - lo]
                        .iter_mut()
                        .zip(&src[lo..hi])
                        .for_each(|(d, &v)| *d += v);
                } else {
                    for ox in lo..hi {
                        dst[ox * g.s + kx - g.pad] += src[ox];
                    }
                }
            }
        }
    }
}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Conv2dConfig;
    use crate::rng::Rng;
    use crate::Tensor;

    fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal()).collect()
    }

    /// `got` equals the sum of `terms` up to f32 rounding of the terms' absolute sum.
    fn sums_to(got: f64, terms: impl Iterator<Item = f64>) -> bool {
        let (mut sum, mut abs) = (0.0, 0.0);
        for t in terms {
            sum += t;
            abs += t.abs();
        }
        (got - sum).abs() <= 1e-5 * abs + 1e-12
    }

    /// Every output of `combine_pass` against a direct computation (sizes not multiples of the tile or of
    /// BLOCK, with and without each option).
    #[test]
    fn combine_pass_matches_a_direct_computation() {
        let mut rng = Rng::new(5);
        for &(bsz, ch, p, r, kk, fast) in &[
            (3, 5, 7, 2, 9, true),
            (3, 5, 7, 2, 9, false),
            (2, 37, 1100, 1, 9, true),
            (4, 17, 4097, 3, 9, true),
            (1, 1, 1, 2, 9, true),
            // Two repetitions (the AVX2 kernel where the CPU has it, and the generic loops): odd batches,
            // channels past a block, pixels past a vector and a tile, 1×1, 3×3 and 5×5 kernels.
            (5, 33, 1037, 2, 9, true),
            (5, 33, 1037, 2, 9, false),
            (8, 64, 600, 2, 1, true),
            (2, 20, 4100, 2, 25, true),
            (1, 3, 13, 2, 25, false),
        ] {
            let data = randn(&mut rng, bsz * ch * p);
            let c: Vec<f64> = (0..r * bsz).map(|i| 1.0 + (i % 3) as f64 * 0.25).collect();
            let w = randn(&mut rng, r * kk * ch);
            let t: Vec<f64> = (0..r * ch).map(|i| -1.5 + (i % 5) as f64 * 0.5).collect();
            let mut out = Combined::default();
            for (with_batch, with_chan) in [(true, true), (true, false), (false, true)] {
                let batch = with_batch.then_some((c.as_slice(), w.as_slice(), kk));
                let chan = with_chan.then_some(t.as_slice());
                combine_with(&data, bsz, ch, (p, 0, p), r, batch, chan, &mut out, fast);
                let x = |b: usize, j: usize, q: usize| data[(b * ch + j) * p + q] as f64;
                for q in 0..p {
                    for b in 0..bsz {
                        assert!(sums_to(
                            out.bsq[b * p + q],
                            (0..ch).map(|j| x(b, j, q).powi(2))
                        ));
                    }
                }
                assert_eq!(out.chn2.len(), if with_chan { ch } else { 0 });
                for j in 0..out.chn2.len() {
                    let terms = (0..bsz)
                        .flat_map(|b| (0..p).map(move |q| (b, q)))
                        .map(|(b, q)| x(b, j, q).powi(2));
                    assert!(sums_to(out.chn2[j], terms));
                }
                for ri in 0..r {
                    for q in 0..p {
                        let comb = |j: usize| -> f64 {
                            (0..bsz).map(|b| c[ri * bsz + b] * x(b, j, q)).sum()
                        };
                        if with_batch {
                            let got = out.comb_sq[ri * p + q];
                            assert!(sums_to(got, (0..ch).map(|j| comb(j).powi(2))));
                            for o in 0..kk {
                                let got = out.contracted[(ri * kk + o) * p + q];
                                let terms = (0..ch).flat_map(|j| (0..bsz).map(move |b| (j, b)));
                                let terms = terms.map(|(j, b)| {
                                    w[(ri * kk + o) * ch + j] as f64 * c[ri * bsz + b] * x(b, j, q)
                                });
                                assert!(sums_to(got, terms));
                            }
                        }
                        if with_chan {
                            for b in 0..bsz {
                                let got = out.proj[(ri * bsz + b) * p + q];
                                assert!(sums_to(got, (0..ch).map(|j| t[ri * ch + j] * x(b, j, q))));
                            }
                        }
                    }
                }
                assert_eq!(out.contracted.is_empty(), !with_batch);
                assert_eq!(out.proj.is_empty(), !with_chan);
            }
        }
    }

    #[test]
    fn a_range_of_pixels_gives_the_pass_over_a_copy_of_those_pixels() {
        let mut rng = Rng::new(21);
        // Both kernels (two repetitions), the generic one (three), ranges at the rows' start, inside and at
        // their end, a range shorter than a vector.
        for (bsz, ch, dp, r, kk, q0, p) in [
            (5, 33, 1037, 2, 9, 0, 400),
            (5, 33, 1037, 2, 9, 500, 537),
            (3, 17, 300, 3, 9, 37, 101),
            (2, 20, 4100, 2, 1, 4093, 7),
        ] {
            let data = randn(&mut rng, bsz * ch * dp);
            let copy: Vec<f32> = data
                .chunks_exact(dp)
                .flat_map(|row| row[q0..q0 + p].iter().copied())
                .collect();
            let c: Vec<f64> = (0..r * bsz).map(|i| 1.0 + (i % 3) as f64 * 0.25).collect();
            let w = randn(&mut rng, r * kk * ch);
            let t: Vec<f64> = (0..r * ch).map(|i| -1.5 + (i % 5) as f64 * 0.5).collect();
            let batch = Some((c.as_slice(), w.as_slice(), kk));
            let (mut band, mut whole) = (Combined::default(), Combined::default());
            combine_pass_range(&data, bsz, ch, (dp, q0, p), r, batch, Some(&t), &mut band);
            combine_pass(&copy, bsz, ch, p, r, batch, Some(&t), &mut whole);
            assert_eq!(band.contracted, whole.contracted);
            assert_eq!(band.comb_sq, whole.comb_sq);
            assert_eq!(band.bsq, whole.bsq);
            assert_eq!(band.proj, whole.proj);
            assert_eq!(band.chn2, whole.chn2);
            assert_eq!(band.contracted.len(), r * kk * p);
        }
    }

    #[test]
    fn weight_side_sums_match_a_direct_computation() {
        let mut rng = Rng::new(9);
        for &(m, n, kk) in &[(3, 5, 9), (4, 7, 1), (2, 3, 4), (5, 6, 25), (1, 1, 9)] {
            let cols = n * kk;
            let w = randn(&mut rng, m * cols);
            let t: Vec<f64> = (0..n).map(|j| 0.5 + j as f64 * 0.37).collect();
            let tk: Vec<f64> = t.iter().flat_map(|&v| std::iter::repeat_n(v, kk)).collect();
            for row in w.chunks_exact(cols) {
                for square in [false, true] {
                    let mut got = vec![0.25f64; kk];
                    period_dot(row, &tk, kk, square, &mut got);
                    for o in 0..kk {
                        let terms = (0..n).map(|j| {
                            let v = row[j * kk + o] as f64;
                            tk[j * kk + o] * if square { v * v } else { v }
                        });
                        assert!(sums_to(got[o] - 0.25, terms), "period_dot m{m} n{n} kk{kk}");
                    }
                }
            }
            let r = 2;
            let coef: Vec<f64> = (0..r * m).map(|i| 1.0 + i as f64 * 0.5).collect();
            let mut out = vec![0f64; r * cols];
            combine_rows(&w, m, cols, &coef, r, &mut out);
            let mut sq = vec![0f64; cols];
            column_squares(&w, cols, &mut sq);
            for i in 0..cols {
                for ri in 0..r {
                    let terms = (0..m).map(|mi| coef[ri * m + mi] * w[mi * cols + i] as f64);
                    assert!(sums_to(out[ri * cols + i], terms));
                }
                assert!(sums_to(
                    sq[i],
                    (0..m).map(|mi| (w[mi * cols + i] as f64).powi(2))
                ));
            }
        }
    }

    #[test]
    fn lhs_and_merge_passes_match_a_direct_computation() {
        let mut rng = Rng::new(6);
        for &(bsz, ch, p, r) in &[
            (2, 3, 5, 2),
            (3, 19, 1500, 1),
            (2, 33, 1025, 3),
            (3, 19, 1501, 2),
        ] {
            let data = randn(&mut rng, bsz * ch * p);
            let addend = randn(&mut rng, bsz * ch * p);
            let k: Vec<f64> = (0..r * bsz * ch)
                .map(|i| 1.0 - (i % 4) as f64 * 0.6)
                .collect();
            let mut plain = Lhs::default();
            lhs_pass(&data, bsz, ch, p, r, &k, &mut plain);
            let mut merged = Lhs::default();
            let mut y = data.clone();
            merge_lhs_pass(&mut y, &addend, bsz, ch, p, r, &k, &mut merged);
            for (i, v) in y.iter().enumerate() {
                assert_eq!(*v, data[i] + addend[i]);
            }
            assert_eq!(plain.lhs, merged.lhs);
            assert_eq!(plain.sq, merged.sq);
            // The values as a frame holds them, one byte off 4-alignment, merged into the addend's buffer.
            let mut frame = vec![0u8; 1 + 4 * data.len()];
            for (w, v) in frame[1..].chunks_exact_mut(4).zip(&data) {
                w.copy_from_slice(&v.to_le_bytes());
            }
            let (words, _) = frame[1..].as_chunks::<4>();
            let mut into = Lhs::default();
            let mut dst = addend.clone();
            merge_into_lhs_pass(words, &mut dst, bsz, ch, p, r, &k, &mut into);
            assert_eq!(dst, y);
            assert_eq!(plain.lhs, into.lhs);
            assert_eq!(plain.sq, into.sq);
            // The portable loops round the same way as the AVX2 kernel (f32 sums over BLOCK channels).
            let mut generic = Lhs::default();
            lhs_start(data.len(), bsz, ch, (p, 0, p), r, &k, &mut generic);
            lhs_generic(&data, bsz, ch, (p, 0, p), r, &k, &mut generic);
            for (a, b) in generic.lhs.iter().zip(&plain.lhs) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
            for ri in 0..r {
                for q in 0..p {
                    let terms = || {
                        (0..bsz)
                            .flat_map(|b| (0..ch).map(move |j| (b, j)))
                            .map(|(b, j)| {
                                k[(ri * bsz + b) * ch + j] * data[(b * ch + j) * p + q] as f64
                            })
                    };
                    assert!(sums_to(plain.lhs[ri * p + q], terms()));
                    assert!(sums_to(plain.sq[ri * p + q], terms().map(|a| a * a)));
                }
            }
        }
    }

    #[test]
    fn lhs_passes_band_by_band_are_the_whole_pass() {
        let mut rng = Rng::new(16);
        for &(bsz, ch, p, r, bands) in &[
            // Bands of whole multiples of 8 pixels: the same sums bit for bit.
            (2, 19, 1501, 2, &[0usize, 64, 1024, 1496, 1501][..]),
            (3, 5, 40, 1, &[0, 8, 40]),
            (2, 7, 100, 3, &[0, 48, 100]),
            // Ragged bands: a pixel's sums then differ by rounding only.
            (2, 19, 303, 2, &[0, 1, 150, 301, 303]),
        ] {
            let data = randn(&mut rng, bsz * ch * p);
            let addend = randn(&mut rng, bsz * ch * p);
            let k: Vec<f64> = (0..r * bsz * ch)
                .map(|i| 1.5 - (i % 7) as f64 * 0.5)
                .collect();
            let mut whole = Lhs::default();
            lhs_pass(&data, bsz, ch, p, r, &k, &mut whole);
            let exact = bands.iter().all(|b| b % 8 == 0 || *b == p);
            let words: Vec<[u8; 4]> = data.iter().map(|v| v.to_le_bytes()).collect();
            let (mut y, mut dst) = (data.clone(), addend.clone());
            for w in bands.windows(2) {
                let px = (p, w[0], w[1] - w[0]);
                let (mut plain, mut merged, mut into) =
                    (Lhs::default(), Lhs::default(), Lhs::default());
                lhs_pass_range(&data, bsz, ch, px, r, &k, &mut plain);
                merge_lhs_pass_range(&mut y, &addend, bsz, ch, px, r, &k, &mut merged);
                merge_into_lhs_pass_range(&words, &mut dst, bsz, ch, px, r, &k, &mut into, None);
                for got in [&plain, &merged, &into] {
                    assert_eq!(got.lhs, plain.lhs);
                    assert_eq!(got.sq, plain.sq);
                }
                let n = px.2;
                for ri in 0..r {
                    let (a, b) = (&plain.lhs[ri * n..][..n], &whole.lhs[ri * p + px.1..][..n]);
                    let (c, d) = (&plain.sq[ri * n..][..n], &whole.sq[ri * p + px.1..][..n]);
                    if exact {
                        assert_eq!((a, c), (b, d));
                    } else {
                        for (u, v) in a.iter().zip(b).chain(c.iter().zip(d)) {
                            assert!((u - v).abs() <= 1e-5 * (1.0 + v.abs()), "{u} vs {v}");
                        }
                    }
                }
                // Only the band's values were merged so far.
                for row in 0..bsz * ch {
                    for q in [w[0], w[1] - 1] {
                        let i = row * p + q;
                        assert_eq!(y[i], data[i] + addend[i]);
                        assert_eq!(dst[i], data[i] + addend[i]);
                    }
                    if w[1] < p {
                        assert_eq!(y[row * p + w[1]], data[row * p + w[1]]);
                        assert_eq!(dst[row * p + w[1]], addend[row * p + w[1]]);
                    }
                }
            }
            let sum: Vec<f32> = data.iter().zip(&addend).map(|(a, b)| a + b).collect();
            assert_eq!(y, sum);
            assert_eq!(dst, sum);
        }
    }

    #[test]
    fn a_merge_with_a_channel_map_writes_the_map_of_each_sum() {
        // The received values' sums are those of the plain merge; each merged value goes through its channel's
        // map, with BatchNorm's arithmetic (v·a + b, each rounded; then ReLU): bit for bit, in the AVX2 pass
        // (R = 2, on x86-64) and the portable one (R = 1, 3), in bands and in the ragged last pixels.
        let mut rng = Rng::new(29);
        for &(bsz, ch, p, r) in &[
            (2, 19, 1501, 2),
            (3, 5, 40, 1),
            (2, 7, 100, 3),
            (1, 3, 13, 2),
        ] {
            let data = randn(&mut rng, bsz * ch * p);
            let addend = randn(&mut rng, bsz * ch * p);
            let k: Vec<f64> = (0..r * bsz * ch)
                .map(|i| 1.5 - (i % 7) as f64 * 0.5)
                .collect();
            let scale: Vec<f32> = (0..ch).map(|_| rng.normal()).collect();
            let shift: Vec<f32> = (0..ch).map(|_| 0.5 * rng.normal()).collect();
            let words: Vec<[u8; 4]> = data.iter().map(|v| v.to_le_bytes()).collect();
            for relu in [false, true] {
                let map = ChannelMap {
                    scale: &scale,
                    shift: &shift,
                    relu,
                };
                let mut dst = addend.clone();
                let mut plain = addend.clone();
                let (mut with, mut without) = (Lhs::default(), Lhs::default());
                let half = p / 2;
                for (q0, n) in [(0, half), (half, p - half)] {
                    merge_into_lhs_pass_range(
                        &words,
                        &mut dst,
                        bsz,
                        ch,
                        (p, q0, n),
                        r,
                        &k,
                        &mut with,
                        Some(map),
                    );
                    merge_into_lhs_pass_range(
                        &words,
                        &mut plain,
                        bsz,
                        ch,
                        (p, q0, n),
                        r,
                        &k,
                        &mut without,
                        None,
                    );
                    assert_eq!((&with.lhs, &with.sq), (&without.lhs, &without.sq));
                }
                for (i, (got, sum)) in dst.iter().zip(&plain).enumerate() {
                    let c = (i / p) % ch;
                    let y = sum * scale[c] + shift[c];
                    let want = if relu { y.max(0.0) } else { y };
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{bsz} {ch} {p} {r} {relu} at {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn combine_passes_on_several_threads_give_the_one_thread_sums() {
        // Over 2^20 values: the AVX2 kernel shares its pixel tiles among the threads.
        let (bsz, ch, p, r, kk) = (5, 24, 9_001, 2, 9);
        let mut rng = Rng::new(11);
        let data = randn(&mut rng, bsz * ch * p);
        let c: Vec<f64> = (0..r * bsz).map(|i| 1.0 + (i % 3) as f64 * 0.25).collect();
        let w = randn(&mut rng, r * kk * ch);
        let t: Vec<f64> = (0..r * ch).map(|i| -1.5 + (i % 5) as f64 * 0.5).collect();
        for (with_batch, with_chan) in [(true, true), (true, false), (false, true)] {
            let batch = with_batch.then_some((c.as_slice(), w.as_slice(), kk));
            let chan = with_chan.then_some(t.as_slice());
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut out = Combined::default();
                pool.install(|| combine_pass(&data, bsz, ch, p, r, batch, chan, &mut out));
                out
            };
            let one = run(1);
            for threads in [2, 4] {
                let many = run(threads);
                assert_eq!(one.contracted, many.contracted);
                assert_eq!(one.comb_sq, many.comb_sq);
                assert_eq!(one.bsq, many.bsq);
                assert_eq!(one.proj, many.proj);
                assert_eq!(one.chn2, many.chn2);
            }
            // And the sums are right: a few pixels against a direct computation.
            let x = |b: usize, j: usize, q: usize| data[(b * ch + j) * p + q] as f64;
            for q in [0, 7, 1000, p - 1] {
                for b in 0..bsz {
                    assert!(sums_to(
                        one.bsq[b * p + q],
                        (0..ch).map(|j| x(b, j, q).powi(2))
                    ));
                }
                if with_batch {
                    let comb = |j: usize| (0..bsz).map(|b| c[b] * x(b, j, q)).sum::<f64>();
                    assert!(sums_to(one.comb_sq[q], (0..ch).map(|j| comb(j).powi(2))));
                }
            }
        }
    }

    #[test]
    fn lhs_passes_on_several_threads_give_the_one_thread_sums() {
        // Enough values (over 2^20) for the AVX2 kernel to share its pixel tiles among the threads.
        let (bsz, ch, p, r) = (3, 18, 20_011, 2);
        let mut rng = Rng::new(9);
        let data = randn(&mut rng, bsz * ch * p);
        let addend = randn(&mut rng, bsz * ch * p);
        let k: Vec<f64> = (0..r * bsz * ch)
            .map(|i| 1.0 - (i % 5) as f64 * 0.4)
            .collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut plain = Lhs::default();
                lhs_pass(&data, bsz, ch, p, r, &k, &mut plain);
                let (mut y, mut merged) = (data.clone(), Lhs::default());
                merge_lhs_pass(&mut y, &addend, bsz, ch, p, r, &k, &mut merged);
                let words: Vec<[u8; 4]> = data.iter().map(|v| v.to_le_bytes()).collect();
                let (mut dst, mut into) = (addend.clone(), Lhs::default());
                merge_into_lhs_pass(&words, &mut dst, bsz, ch, p, r, &k, &mut into);
                (plain, merged, y, into, dst)
            })
        };
        let one = run(1);
        for threads in [3, 4] {
            let many = run(threads);
            for (a, b) in [(&one.0, &many.0), (&one.1, &many.1), (&one.3, &many.3)] {
                assert_eq!(a.lhs, b.lhs, "{threads} threads");
                assert_eq!(a.sq, b.sq, "{threads} threads");
            }
            assert_eq!(one.2, many.2);
            assert_eq!(one.4, many.4);
        }
        let sum: Vec<f32> = data.iter().zip(&addend).map(|(a, b)| a + b).collect();
        assert_eq!(one.2, sum);
        assert_eq!(one.4, sum);
        for q in [0, 1, 4095, p - 9, p - 1] {
            let terms = || {
                (0..bsz)
                    .flat_map(|b| (0..ch).map(move |j| (b, j)))
                    .map(|(b, j)| k[b * ch + j] * data[(b * ch + j) * p + q] as f64)
            };
            assert!(sums_to(one.0.lhs[q], terms()));
        }
    }

    #[test]
    fn offsets_give_the_one_channel_conv_and_its_transpose() {
        let mut rng = Rng::new(8);
        for &(n, k, stride, pad, h, w) in &[
            (3, 3, 1, 1, 9, 7),
            (5, 3, 2, 1, 8, 9),
            (4, 1, 2, 0, 7, 7),
            (2, 7, 2, 3, 11, 10),
        ] {
            let cfg = Conv2dConfig {
                stride,
                padding: pad,
                bias: false,
            };
            let mut conv = Conv2d::new(n, 1, k, cfg, &mut rng);
            let x = Tensor::from_vec(&[1, n, h, w], randn(&mut rng, n * h * w)).unwrap();
            let mut y = Tensor::default();
            conv.forward(&x, &mut y).unwrap();
            let g = Geo::of(&conv, &x.shape).unwrap();
            let kk = k * k;
            // contracted[o, q] = Σ_j w[j, o] x[j, q] (one repetition, batch of one with c = 1).
            let wc: Vec<f32> = (0..kk)
                .flat_map(|o| (0..n).map(move |j| (o, j)))
                .map(|(o, j)| conv.weight.value.data[j * kk + o])
                .collect();
            let mut comb = Combined::default();
            combine_pass(
                &x.data,
                1,
                n,
                h * w,
                1,
                Some((&[1.0], &wc, kk)),
                None,
                &mut comb,
            );
            let mut z = vec![0f64; g.p()];
            gather_offsets(&comb.contracted, &g, &mut z);
            for (a, b) in z.iter().zip(&y.data) {
                assert!((a - *b as f64).abs() < 1e-4, "{a} vs {b}");
            }
            // The transpose: dx = conv_transposed(dy, w) for one input channel's weights.
            let mut conv_t = Conv2d::new(1, n, k, cfg, &mut rng);
            let x1 = Tensor::from_vec(&[1, 1, h, w], randn(&mut rng, h * w)).unwrap();
            let mut y1 = Tensor::default();
            conv_t.forward(&x1, &mut y1).unwrap();
            let dy = Tensor::from_vec(&y1.shape, randn(&mut rng, y1.len())).unwrap();
            let mut dx = Tensor::default();
            conv_t.backward(&x1, &dy, Some(&mut dx)).unwrap();
            let g1 = Geo::of(&conv_t, &x1.shape).unwrap();
            let wc1: Vec<f32> = (0..kk)
                .flat_map(|o| (0..n).map(move |m| (o, m)))
                .map(|(o, m)| conv_t.weight.value.data[m * kk + o])
                .collect();
            combine_pass(
                &dy.data,
                1,
                n,
                g1.p(),
                1,
                Some((&[1.0], &wc1, kk)),
                None,
                &mut comb,
            );
            let mut rhs = vec![0f64; h * w];
            scatter_offsets(&comb.contracted, &g1, &mut rhs);
            for (a, b) in rhs.iter().zip(&dx.data) {
                assert!((a - *b as f64).abs() < 1e-4, "{a} vs {b}");
            }
            // ∇W of the one-channel conv is the correlation weight_grad_one computes (one channel each side).
            conv_t.weight.zero_grad();
            let dy0: Vec<f32> = dy.data[..g1.p()].to_vec();
            let dy_one = Tensor::from_vec(&[1, 1, g1.oh, g1.ow], dy0.clone()).unwrap();
            let mut c1 = Conv2d::new(1, 1, k, cfg, &mut rng);
            c1.weight.zero_grad();
            c1.backward(&x1, &dy_one, None).unwrap();
            let dys: Vec<f64> = dy0.iter().map(|&v| v as f64).collect();
            let mut wg = vec![0f64; kk];
            weight_grad_one(&dys, &x1.data, &Geo::of(&c1, &x1.shape).unwrap(), &mut wg);
            for (a, b) in wg.iter().zip(&c1.weight.grad.data) {
                assert!((a - *b as f64).abs() < 1e-3, "{a} vs {b}");
            }
        }
    }
}
