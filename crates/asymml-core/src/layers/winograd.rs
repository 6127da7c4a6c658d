//! Winograd F(2×2, 3×3) for 3×3 stride-1 pad-1 convolutions (Lavin & Gray 2015, "Fast Algorithms for
//! Convolutional Neural Networks"): Y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A over 4×4 input tiles with stride 2.
//!
//! The 16 elementwise products of a tile become 16 GEMMs, one per transform position ξ:
//! M[ξ] [M × N] = U[ξ] [M × C] · V[ξ] [C × N], where N runs over the tiles of a group of images.
//!
//! Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]
//! G  = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]
//! Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]

use crate::gemm::{sgemm, Mat};
use rayon::prelude::*;
use std::ops::Range;

/// Number of transform positions of F(2×2, 3×3).
pub const XI: usize = 16;

/// Fewest GEMM inner-dimension channels for which Winograd beats im2col.
pub const MIN_C: usize = 8;

/// True when Winograd F(2×2, 3×3) should compute a conv: 3×3, stride 1, pad 1, with `c_in` input channels
/// (the GEMMs' inner dimension) over an H×W map. Maps whose tiles waste too much of the 4×4 transform
/// (2×2, 3×3, 5×3, ...) stay on im2col: Winograd needs at least 4 tiles per image and 1.5× fewer products
/// than the direct conv (9·H·W vs 16 per tile).
pub fn suits(k: usize, stride: usize, pad: usize, c_in: usize, h: usize, w: usize) -> bool {
    let (th, tw) = tiles(h, w);
    (k, stride, pad) == (3, 1, 1) && c_in >= MIN_C && th * tw >= 4 && 3 * h * w >= 8 * th * tw
}

/// Tiles of an H×W map (pad 1, stride 1, so the output is H×W too): (rows, cols) of 2×2 output tiles.
pub fn tiles(h: usize, w: usize) -> (usize, usize) {
    (h.div_ceil(2), w.div_ceil(2))
}

/// w: [M, C, 3, 3] → u: [M, 16, C] (forward: y = conv(x, w); U[ξ] is the M × C matrix at offset ξ·C with
/// row stride 16·C), or with `transposed` u: [C, 16, M] holding the transforms of the flipped kernels
/// w[m, c, 2 − i, 2 − j] (∇X = conv(∇Y, flipped wᵀ, pad 1)). Parallel over the rows of U.
pub fn transform_weights(w: &[f32], m: usize, c: usize, transposed: bool, u: &mut Vec<f32>) {
    let (rows, cols) = if transposed { (c, m) } else { (m, c) };
    u.resize(XI * m * c, 0.0);
    u.par_chunks_mut(XI * cols)
        .enumerate()
        .for_each(|(r, ur)| weights_row(w, rows, cols, r, transposed, ur));
}

simd_fn! {
/// Row r of U (see [`transform_weights`]): ur: [16, cols].
fn weights_row(w: &[f32], rows: usize, cols: usize, r: usize, transposed: bool, ur: &mut [f32]) {
    const NB: usize = 64;
    // Blocks of NB columns: kernels gathered into g: [9][NB], transformed into u: [16][NB] with the loops
    // running across the block.
    let mut g = [[0.0f32; NB]; 9];
    let mut t = [[0.0f32; NB]; 12];
    let mut u = [[0.0f32; NB]; 16];
    for j0 in (0..cols).step_by(NB) {
        let nb = (cols - j0).min(NB);
        for jj in 0..nb {
            let j = j0 + jj;
            if transposed {
                let src = &w[(j * rows + r) * 9..][..9];
                for k in 0..9 {
                    g[k][jj] = src[8 - k];
                }
            } else {
                let src = &w[(r * cols + j) * 9..][..9];
                for k in 0..9 {
                    g[k][jj] = src[k];
                }
            }
        }
        // t = G g: [4, 3]
        for b in 0..3 {
            for jj in 0..NB {
                let (g0, g1, g2) = (g[b][jj], g[3 + b][jj], g[6 + b][jj]);
                t[b][jj] = g0;
                t[3 + b][jj] = 0.5 * (g0 + g1 + g2);
                t[6 + b][jj] = 0.5 * (g0 - g1 + g2);
                t[9 + b][jj] = g2;
            }
        }
        // u = t Gᵀ: [4, 4]
        for i in 0..4 {
            for jj in 0..NB {
                let (t0, t1, t2) = (t[3 * i][jj], t[3 * i + 1][jj], t[3 * i + 2][jj]);
                u[4 * i][jj] = t0;
                u[4 * i + 1][jj] = 0.5 * (t0 + t1 + t2);
                u[4 * i + 2][jj] = 0.5 * (t0 - t1 + t2);
                u[4 * i + 3][jj] = t2;
            }
        }
        for (xi, uv) in u.iter().enumerate() {
            ur[xi * cols + j0..][..nb].copy_from_slice(&uv[..nb]);
        }
    }
}
}

/// Per-worker buffers of the transforms.
#[derive(Default)]
pub struct Work {
    /// Transformed input V [16, C, N].
    pub v: Vec<f32>,
    /// Products M [16, M, N].
    pub m: Vec<f32>,
    /// Transformed output gradient A ∇Y Aᵀ [16, M, N] (for ∇W).
    d: Vec<f32>,
    /// Weight-gradient partial sums in the transform domain [16, M, C].
    pub du: Vec<f32>,
    /// One zero-padded input plane split into even and odd columns: [2, 2·TH + 2, TW + 1] (its border stays
    /// zero between channels).
    pad: Vec<f32>,
    /// (H, W) the border of `pad` was zeroed for.
    pad_hw: (usize, usize),
    /// Row transforms of one plane: [4 (k), 2 (row parity), TH + 1, TW].
    rows: Vec<f32>,
    /// Output-side planes: [4, TH·TW].
    planes: Vec<f32>,
    /// [`conv_rows`]'s window of input rows, [rows, C, W].
    window: Vec<f32>,
}

simd_fn! {
/// x: an image of C channels, H×W, tile rows `band` → columns `off..off + |band|·TW` of v: [16, C, ld]
/// (V[ξ][c][t] = (Bᵀ d_t B)[ξ], d_t the 4×4 zero-padded input tile of tile t = (ty − band.start)·TW + tx,
/// whose top-left pixel is (2ty − 1, 2tx − 1)). Row `iy` of channel `ci` is W values at
/// `x[ci·cs + (iy − row0)·rs ..]` (`at` = (row0, cs, rs)): [C, H, W] is (0, H·W, W); a window of rows from
/// `row0` on held as [rows, C, W] is (row0, W, C·W). Only the rows the band reads are read.
fn input_transform(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    at: (usize, usize, usize),
    wk: &mut Work,
    ld: usize,
    off: usize,
    band: Range<usize>,
) {
    let (th, tw) = tiles(h, w);
    let (nrows, sw) = (2 * th + 2, tw + 1);
    let q = band.len() * tw;
    // Padded rows 2·band.start ..= 2·band.end + 1 are read: image rows 2·band.start − 1 .. 2·band.end + 1.
    let (pr0, pr1) = (2 * band.start, 2 * band.end + 2);
    let (r0, r1) = (pr0.saturating_sub(1), (pr1 - 1).min(h));
    if wk.pad_hw != (h, w) || wk.pad.len() != 2 * nrows * sw {
        wk.pad_hw = (h, w);
        wk.pad.clear();
        wk.pad.resize(2 * nrows * sw, 0.0);
    }
    // Every row of `rows` is written below (even padded rows 0..=2TH, odd 1..=2TH+1).
    wk.rows.resize(8 * (th + 1) * tw, 0.0);
    let cl = c * ld;
    let v = &mut wk.v;
    let (row0, cs, rs) = at;
    for ci in 0..c {
        // Padded row p[j] = x[j − 1] split into even columns e[i] = p[2i] and odd ones o[i] = p[2i + 1]; the
        // zero border (e[0], o[TW], e[TW] for odd W, rows 0 and H + 1..) is never written.
        let (pe, po) = wk.pad.split_at_mut(nrows * sw);
        for r in r0..r1 {
            let xr = &x[ci * cs + (r - row0) * rs..][..w];
            let e = &mut pe[(r + 1) * sw..][..sw];
            let o = &mut po[(r + 1) * sw..][..sw];
            for ((pair, o), e) in xr.chunks_exact(2).zip(o.iter_mut()).zip(e[1..].iter_mut()) {
                *o = pair[0];
                *e = pair[1];
            }
            if w % 2 == 1 {
                o[tw - 1] = xr[w - 1];
            }
        }
        // Row transforms of every padded row pr (d0 = e[t], d1 = o[t], d2 = e[t + 1], d3 = o[t + 1]), stored
        // by row parity.
        for pr in pr0..pr1 {
            let e = &pe[pr * sw..][..sw];
            let o = &po[pr * sw..][..sw];
            let at = ((pr % 2) * (th + 1) + pr / 2) * tw;
            let (h01, h23) = wk.rows.split_at_mut(4 * (th + 1) * tw);
            let (h0, h1) = h01.split_at_mut(2 * (th + 1) * tw);
            let (h2, h3) = h23.split_at_mut(2 * (th + 1) * tw);
            let (h0, h1, h2, h3) = (
                &mut h0[at..][..tw],
                &mut h1[at..][..tw],
                &mut h2[at..][..tw],
                &mut h3[at..][..tw],
            );
            let (e0, e1, o0, o1) = (&e[..tw], &e[1..], &o[..tw], &o[1..]);
            for t in 0..tw {
                h0[t] = e0[t] - e1[t];
                h1[t] = o0[t] + e1[t];
                h2[t] = e1[t] - o0[t];
                h3[t] = o0[t] - o1[t];
            }
        }
        // Column transforms: tile t of row ty uses padded rows 2ty (even ty), 2ty + 1 (odd ty),
        // 2ty + 2 (even ty + 1), 2ty + 3 (odd ty + 1): linear in t = ty·TW + tx.
        for k in 0..4 {
            let hk = &wk.rows[k * 2 * (th + 1) * tw..][..2 * (th + 1) * tw];
            let (ev, od) = hk.split_at((th + 1) * tw);
            let b0 = band.start * tw;
            let (r0, r1) = (&ev[b0..b0 + q], &od[b0..b0 + q]);
            let (r2, r3) = (&ev[b0 + tw..b0 + tw + q], &od[b0 + tw..b0 + tw + q]);
            let at = ci * ld + off;
            let v0 = &mut v[k * cl + at..][..q];
            for t in 0..q {
                v0[t] = r0[t] - r2[t];
            }
            let v1 = &mut v[(4 + k) * cl + at..][..q];
            for t in 0..q {
                v1[t] = r1[t] + r2[t];
            }
            let v2 = &mut v[(8 + k) * cl + at..][..q];
            for t in 0..q {
                v2[t] = r2[t] - r1[t];
            }
            let v3 = &mut v[(12 + k) * cl + at..][..q];
            for t in 0..q {
                v3[t] = r1[t] - r3[t];
            }
        }
    }
}
}

simd_fn! {
/// Columns `off..off + |band|·TW` of mm: [16, M, ld] → the output rows of tile rows `band` of y: [M, H, W] =
/// Aᵀ M A per tile (cropped at odd edges), plus `bias` [M] if given.
fn output_transform(
    mm: &[f32],
    m: usize,
    h: usize,
    w: usize,
    ld: usize,
    off: usize,
    band: Range<usize>,
    y: &mut [f32],
    bias: Option<&[f32]>,
    s: &mut Vec<f32>,
) {
    let tw = tiles(h, w).1;
    let q = band.len() * tw;
    let ml = m * ld;
    // s: [4 (y00, y01, y10, y11) + 8 (s_ak), TH·TW]
    s.resize(12 * q, 0.0);
    for mi in 0..m {
        let b = bias.map_or(0.0, |b| b[mi]);
        let ym = &mut y[mi * h * w..][..h * w];
        let at = mi * ld + off;
        let r = |xi: usize| &mm[xi * ml + at..][..q];
        // s_0k = m_0k + m_1k + m_2k, s_1k = m_1k − m_2k − m_3k (s: [8, TH·TW] after the four outputs)
        let (ys, sk) = s.split_at_mut(4 * q);
        for k in 0..4 {
            let (m0, m1, m2, m3) = (r(k), r(4 + k), r(8 + k), r(12 + k));
            let (s0, s1) = sk[2 * k * q..][..2 * q].split_at_mut(q);
            for t in 0..q {
                s0[t] = m0[t] + m1[t] + m2[t];
                s1[t] = m1[t] - m2[t] - m3[t];
            }
        }
        // y_a0 = s_a0 + s_a1 + s_a2 + b, y_a1 = s_a1 − s_a2 − s_a3 + b
        for a in 0..2 {
            let sa = |k: usize| &sk[(2 * k + a) * q..][..q];
            let (s0, s1, s2, s3) = (sa(0), sa(1), sa(2), sa(3));
            let (ya0, ya1) = ys[2 * a * q..][..2 * q].split_at_mut(q);
            for t in 0..q {
                ya0[t] = s0[t] + s1[t] + s2[t] + b;
                ya1[t] = s1[t] - s2[t] - s3[t] + b;
            }
        }
        let (y00, rest) = ys.split_at(q);
        let (y01, rest) = rest.split_at(q);
        let (y10, y11) = rest.split_at(q);
        for ty in band.clone() {
            let lt = ty - band.start;
            for (a, (ya0, ya1)) in [(y00, y01), (y10, y11)].into_iter().enumerate() {
                let oy = 2 * ty + a;
                if oy >= h {
                    break;
                }
                let (ya0, ya1) = (&ya0[lt * tw..][..tw], &ya1[lt * tw..][..tw]);
                let out = &mut ym[oy * w..][..w];
                let (pairs, tail) = out.split_at_mut(w / 2 * 2);
                for ((p, &v0), &v1) in pairs.chunks_exact_mut(2).zip(ya0).zip(ya1) {
                    p[0] = v0;
                    p[1] = v1;
                }
                if let Some(last) = tail.first_mut() {
                    *last = ya0[tw - 1];
                }
            }
        }
    }
}
}

/// The shape of a group of images through a 3×3 stride-1 pad-1 conv: `g` images of C channels, H×W, to M
/// channels (the same H×W).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    pub g: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub m: usize,
}

/// The 16 transform-domain products of a band of `n` tiles: M[ξ] [M × n] = U[ξ] [M × C] · V[ξ] [C × n].
fn products(u: &[f32], c: usize, m: usize, n: usize, wk: &mut Work, threads: usize) {
    for xi in 0..XI {
        sgemm(
            m,
            n,
            c,
            Mat::rm_from(u, XI * c, xi * c),
            Mat::rm(&wk.v[xi * c * n..][..c * n], n),
            &mut wk.m[xi * m * n..][..m * n],
            false,
            threads,
        );
    }
}

/// A group of `g` images x: [g, C, H, W] → y: [g, M, H, W] = conv3×3(x, w, pad 1) (+ bias), with
/// u: [M, 16, C] from [`transform_weights`]. `threads` is passed to the GEMMs.
pub fn conv(
    x: &[f32],
    shape: Group,
    u: &[f32],
    y: &mut [f32],
    bias: Option<&[f32]>,
    wk: &mut Work,
    threads: usize,
) {
    let Group { g, c, h, w, m } = shape;
    let (th, tw) = tiles(h, w);
    let (xlen, ylen) = (c * h * w, m * h * w);
    for band in bands(g, th, tw, BAND_TILES) {
        let tp = band.len() * tw;
        let n = g * tp;
        wk.v.resize(XI * c * n, 0.0);
        wk.m.resize(XI * m * n, 0.0);
        for i in 0..g {
            let xi = &x[i * xlen..][..xlen];
            input_transform(xi, c, h, w, (0, h * w, w), wk, n, i * tp, band.clone());
        }
        products(u, c, m, n, wk, threads);
        for i in 0..g {
            let yi = &mut y[i * ylen..][..ylen];
            output_transform(
                &wk.m,
                m,
                h,
                w,
                n,
                i * tp,
                band.clone(),
                yi,
                bias,
                &mut wk.planes,
            );
        }
    }
}

/// [`conv`] of one image (`shape.g` = 1) whose input is not held whole: for each band of at most
/// `band_tiles` tiles, `fill(rows, out)` writes the input rows `rows` the band reads and that are not held yet,
/// as [rows, C, W] into `out`; the rows a band shares with the next are kept (a window of a few rows, in
/// `wk`). The result is [`conv`]'s on the image those rows make up. For an input made on the fly (the split's
/// V_b, made from X and U_b a few rows at a time): the whole input (r × H·W) is never held.
#[allow(clippy::too_many_arguments)]
pub fn conv_rows(
    shape: Group,
    u: &[f32],
    y: &mut [f32],
    bias: Option<&[f32]>,
    wk: &mut Work,
    threads: usize,
    band_tiles: usize,
    fill: &mut dyn FnMut(Range<usize>, &mut [f32]),
) {
    let Group { g, c, h, w, m } = shape;
    assert_eq!(g, 1, "conv_rows: one image");
    let (th, tw) = tiles(h, w);
    let cw = c * w;
    // The window holds input rows lo .. hi as [rows, C, W].
    let (mut lo, mut hi) = (0usize, 0usize);
    let mut win = std::mem::take(&mut wk.window);
    for band in bands(1, th, tw, band_tiles.max(1)) {
        let n = band.len() * tw;
        // The rows the band reads (as `input_transform` computes them).
        let (r0, r1) = (
            (2 * band.start).saturating_sub(1),
            (2 * band.end + 1).min(h),
        );
        let keep = hi.saturating_sub(r0.max(lo));
        if keep > 0 {
            win.copy_within((hi - keep - lo) * cw..(hi - lo) * cw, 0);
        }
        let from = hi.max(r0);
        lo = from - keep;
        win.resize((r1.max(from) - lo) * cw, 0.0);
        if r1 > from {
            fill(from..r1, &mut win[(from - lo) * cw..(r1 - lo) * cw]);
        }
        hi = r1.max(from);
        wk.v.resize(XI * c * n, 0.0);
        wk.m.resize(XI * m * n, 0.0);
        input_transform(&win, c, h, w, (lo, w, cw), wk, n, 0, band.clone());
        products(u, c, m, n, wk, threads);
        output_transform(&wk.m, m, h, w, n, 0, band, y, bias, &mut wk.planes);
    }
    wk.window = win;
}

/// Most tiles a band of one image holds: the transform buffers of a large map (V and M: 16·(C + M)
/// floats per tile) are taken a band of tile rows at a time, so that they stay a few MB whatever the map's
/// size instead of 100 MB for one 224×224 image of 64 channels, and stay in cache between the transforms and
/// the GEMMs (VGG16's convs at 224 px, batch 4, 2 threads: forward 347 → 274 ms, backward 686 → 567 ms
/// against whole-image transforms; `cargo run --release -p asymml-core --example conv_shapes -- 2 224`).
const BAND_TILES: usize = 512;

/// The bands of tile rows a group of `g` images of TH×TW tiles is transformed in: every row at once for a
/// group of several (small) images, else bands of at most [`BAND_TILES`] tiles (at least one row).
fn bands(g: usize, th: usize, tw: usize, most: usize) -> impl Iterator<Item = Range<usize>> {
    let rows = if g > 1 {
        th.max(1)
    } else {
        (most / tw.max(1)).clamp(1, th.max(1))
    };
    (0..th).step_by(rows).map(move |r| r..(r + rows).min(th))
}

simd_fn! {
/// dy: [M, H, W], tile rows `band` → columns `off..off + |band|·TW` of d: [16, M, ld] (D[ξ][m][t] =
/// (A ∇y_t Aᵀ)[ξ] with ∇y_t the 2×2 output-gradient tile t, zero outside the map;
/// A = [[1, 0], [1, 1], [1, −1], [0, −1]]).
fn grad_transform(
    dy: &[f32],
    m: usize,
    h: usize,
    w: usize,
    d: &mut [f32],
    ld: usize,
    off: usize,
    band: Range<usize>,
    s: &mut Vec<f32>,
) {
    let tw = tiles(h, w).1;
    let q = band.len() * tw;
    let ml = m * ld;
    // s: [4 (a, b, c, e), TH·TW]: a = ∇y[2ty][2tx], b = ∇y[2ty][2tx + 1], c = ∇y[2ty + 1][2tx],
    // e = ∇y[2ty + 1][2tx + 1] (zero past the edges: those entries are never written below)
    s.clear();
    s.resize(4 * q, 0.0);
    for mi in 0..m {
        let dm = &dy[mi * h * w..][..h * w];
        let rows = dm.chunks_exact(w).enumerate();
        for (y, row) in rows.take((2 * band.end).min(h)).skip(2 * band.start) {
            let at = (2 * (y % 2)) * q + (y / 2 - band.start) * tw;
            let (ev, od) = s[at..].split_at_mut(q);
            let (ev, od) = (&mut ev[..tw], &mut od[..tw]);
            for ((pair, e), o) in row.chunks_exact(2).zip(ev.iter_mut()).zip(od.iter_mut()) {
                *e = pair[0];
                *o = pair[1];
            }
            if w % 2 == 1 {
                ev[tw - 1] = row[w - 1];
            }
        }
        let (a, rest) = s.split_at(q);
        let (b, rest) = rest.split_at(q);
        let (c, e) = rest.split_at(q);
        let at = mi * ld + off;
        // Rows of A∇y: (a, b), (a + c, b + e), (a − c, b − e), (−c, −e); each row (p, q) becomes
        // (p, p + q, p − q, −q).
        // out[4i + k] = α_k·(pa_i·a + pc_i·c) + β_k·(pa_i·b + pc_i·e)
        const PA: [f32; 4] = [1.0, 1.0, 1.0, 0.0];
        const PC: [f32; 4] = [0.0, 1.0, -1.0, -1.0];
        for i in 0..4 {
            for k in 0..4 {
                let (ca, cc) = (PA[k] * PA[i], PA[k] * PC[i]);
                let (cb, ce) = (PC[k] * PA[i], PC[k] * PC[i]);
                let out = &mut d[(4 * i + k) * ml + at..][..q];
                let (a, b, c, e) = (&a[..q], &b[..q], &c[..q], &e[..q]);
                for t in 0..q {
                    out[t] = ca * a[t] + cb * b[t] + cc * c[t] + ce * e[t];
                }
            }
        }
    }
}
}

/// A group of `g` images x: [g, C, H, W] and their output gradients dy: [g, M, H, W] → wk.du: [16, M, C]
/// (+)= Σ_tiles (A ∇y Aᵀ) ⊙ (Bᵀ d B), the weight gradient in the transform domain (see [`finish_grad`]);
/// `accumulate` adds to wk.du, otherwise overwrites it.
pub fn grad_weights(
    x: &[f32],
    dy: &[f32],
    shape: Group,
    wk: &mut Work,
    accumulate: bool,
    threads: usize,
) {
    let Group { g, c, h, w, m } = shape;
    let (th, tw) = tiles(h, w);
    wk.du.resize(XI * m * c, 0.0);
    let (xlen, ylen) = (c * h * w, m * h * w);
    for band in bands(g, th, tw, BAND_TILES) {
        let tp = band.len() * tw;
        let n = g * tp;
        wk.v.resize(XI * c * n, 0.0);
        wk.d.resize(XI * m * n, 0.0);
        for i in 0..g {
            let (xi, dyi) = (&x[i * xlen..][..xlen], &dy[i * ylen..][..ylen]);
            input_transform(xi, c, h, w, (0, h * w, w), wk, n, i * tp, band.clone());
            let (d, planes) = (&mut wk.d, &mut wk.planes);
            grad_transform(dyi, m, h, w, d, n, i * tp, band.clone(), planes);
        }
        // The first band overwrites ∇U unless asked to accumulate; every later band adds to it.
        let add = accumulate || band.start > 0;
        for xi in 0..XI {
            sgemm(
                m,
                c,
                n,
                Mat::rm(&wk.d[xi * m * n..][..m * n], n),
                Mat::rm_t(&wk.v[xi * c * n..][..c * n], n),
                &mut wk.du[xi * m * c..][..m * c],
                add,
                threads,
            );
        }
    }
}

/// Σ of the workers' transform-domain gradients parts: each [16, M, C] → dw: [M, C, 3, 3] += Gᵀ ΣdU G.
/// Parallel over M.
pub fn finish_grad(parts: &[&[f32]], m: usize, c: usize, dw: &mut [f32]) {
    let mc = m * c;
    dw.par_chunks_mut(c * 9)
        .enumerate()
        .for_each(|(mi, dwm)| grad_row(parts, mc, mi, c, dwm));
}

simd_fn! {
/// Row mi of ∇W (see [`finish_grad`]): dwm: [C, 3, 3].
fn grad_row(parts: &[&[f32]], mc: usize, mi: usize, c: usize, dwm: &mut [f32]) {
    const NB: usize = 64;
    // Blocks of NB input channels: x: [16][NB] = Σ parts, t = Gᵀ X: [3, 4], o = t G: [3, 3], each loop
    // running across the block. Gᵀ = [[1, ½, ½, 0], [0, ½, −½, 0], [0, ½, ½, 1]].
    let mut x = [[0.0f32; NB]; 16];
    let mut t = [[0.0f32; NB]; 12];
    let mut o = [[0.0f32; NB]; 9];
    for c0 in (0..c).step_by(NB) {
        let nb = (c - c0).min(NB);
        let at = mi * c + c0;
        for (xi, xv) in x.iter_mut().enumerate() {
            xv[..nb].copy_from_slice(&parts[0][xi * mc + at..][..nb]);
            for p in &parts[1..] {
                let src = &p[xi * mc + at..][..nb];
                xv[..nb].iter_mut().zip(src).for_each(|(a, b)| *a += b);
            }
        }
        for k in 0..4 {
            for cc in 0..NB {
                let (x0, x1, x2, x3) = (x[k][cc], x[4 + k][cc], x[8 + k][cc], x[12 + k][cc]);
                t[k][cc] = x0 + 0.5 * (x1 + x2);
                t[4 + k][cc] = 0.5 * (x1 - x2);
                t[8 + k][cc] = 0.5 * (x1 + x2) + x3;
            }
        }
        for a in 0..3 {
            for cc in 0..NB {
                let (t0, t1, t2, t3) = (t[4 * a][cc], t[4 * a + 1][cc], t[4 * a + 2][cc], t[4 * a + 3][cc]);
                o[3 * a][cc] = t0 + 0.5 * (t1 + t2);
                o[3 * a + 1][cc] = 0.5 * (t1 - t2);
                o[3 * a + 2][cc] = 0.5 * (t1 + t2) + t3;
            }
        }
        for cc in 0..nb {
            let out = &mut dwm[(c0 + cc) * 9..][..9];
            for (k, v) in out.iter_mut().enumerate() {
                *v += o[k][cc];
            }
        }
    }
}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn a_conv_of_rows_made_band_by_band_is_the_whole_images_conv() {
        let mut rng = Rng::new(21);
        for &(c, h, w, m, band_tiles) in &[
            (3, 9, 7, 4, 1),
            (11, 16, 16, 8, 8),
            (5, 13, 10, 6, 12),
            (2, 30, 5, 3, 512),
            (4, 1, 1, 2, 1),
        ] {
            let x: Vec<f32> = (0..c * h * w).map(|_| rng.normal()).collect();
            let wt: Vec<f32> = (0..m * c * 9).map(|_| rng.normal()).collect();
            let bias: Vec<f32> = (0..m).map(|_| rng.normal()).collect();
            let mut u = Vec::new();
            transform_weights(&wt, m, c, false, &mut u);
            let shape = Group { g: 1, c, h, w, m };
            let mut whole = vec![0f32; m * h * w];
            conv(
                &x,
                shape,
                &u,
                &mut whole,
                Some(&bias),
                &mut Work::default(),
                1,
            );
            // Every input row asked for once, in order, as [rows, C, W].
            let mut asked = Vec::new();
            let mut fill = |rows: Range<usize>, out: &mut [f32]| {
                asked.extend(rows.clone());
                for (i, r) in rows.enumerate() {
                    for ci in 0..c {
                        out[(i * c + ci) * w..][..w].copy_from_slice(&x[(ci * h + r) * w..][..w]);
                    }
                }
            };
            let mut by_rows = vec![f32::NAN; m * h * w];
            let mut wk = Work::default();
            conv_rows(
                shape,
                &u,
                &mut by_rows,
                Some(&bias),
                &mut wk,
                1,
                band_tiles,
                &mut fill,
            );
            assert_eq!(asked, (0..h).collect::<Vec<_>>());
            assert_eq!(by_rows, whole, "{c} {h} {w} {m} {band_tiles}");
            // The window held a few rows, not the image (one band of tile rows and its border).
            let rows = (band_tiles / w.div_ceil(2)).max(1) * 2 + 2;
            assert!(wk.window.len() <= rows.min(h) * c * w);
        }
    }

    /// Direct 3×3 pad-1 correlation in f64: x: [g, C, H, W], w: [M, C, 3, 3] → [g, M, H, W].
    fn direct(x: &[f32], g: usize, c: usize, h: usize, w: usize, m: usize, wt: &[f32]) -> Vec<f64> {
        let mut y = vec![0.0f64; g * m * h * w];
        for i in 0..g {
            for mi in 0..m {
                for oy in 0..h {
                    for ox in 0..w {
                        let mut s = 0.0f64;
                        for ci in 0..c {
                            for ki in 0..3 {
                                for kj in 0..3 {
                                    let (iy, ix) = (oy + ki, ox + kj);
                                    if iy == 0 || ix == 0 || iy > h || ix > w {
                                        continue;
                                    }
                                    let xv = x[((i * c + ci) * h + iy - 1) * w + ix - 1];
                                    s += xv as f64 * wt[((mi * c + ci) * 3 + ki) * 3 + kj] as f64;
                                }
                            }
                        }
                        y[((i * m + mi) * h + oy) * w + ox] = s;
                    }
                }
            }
        }
        y
    }

    fn rel_err(got: &[f32], want: &[f64]) -> f64 {
        let num: f64 = got
            .iter()
            .zip(want)
            .map(|(&a, &b)| (a as f64 - b).powi(2))
            .sum();
        let den: f64 = want.iter().map(|b| b * b).sum();
        (num / den.max(1e-300)).sqrt()
    }

    #[test]
    fn forward_and_transposed_match_direct() {
        let mut rng = Rng::new(7);
        for &(g, c, m, h, w) in &[
            (1, 1, 1, 1, 1),
            (1, 1, 2, 2, 2),
            (2, 3, 4, 5, 7),
            (1, 4, 3, 6, 6),
            (3, 8, 5, 3, 9),
            (2, 16, 8, 8, 8),
            (1, 2, 3, 11, 4),
            (1, 70, 3, 4, 4),
            (2, 3, 130, 5, 4),
            // One image of more than BAND_TILES tiles: transformed in bands of tile rows (the last one
            // shorter, odd edges included).
            (1, 3, 2, 101, 99),
            (1, 2, 3, 100, 100),
        ] {
            let x: Vec<f32> = (0..g * c * h * w).map(|_| rng.normal()).collect();
            let wt: Vec<f32> = (0..m * c * 9).map(|_| rng.normal()).collect();
            let bias: Vec<f32> = (0..m).map(|_| rng.normal()).collect();
            let mut u = Vec::new();
            transform_weights(&wt, m, c, false, &mut u);
            let mut wk = Work::default();
            let mut y = vec![f32::NAN; g * m * h * w];
            conv(
                &x,
                Group { g, c, h, w, m },
                &u,
                &mut y,
                Some(&bias),
                &mut wk,
                1,
            );
            let mut want = direct(&x, g, c, h, w, m, &wt);
            for (j, v) in want.iter_mut().enumerate() {
                *v += bias[(j / (h * w)) % m] as f64;
            }
            let e = rel_err(&y, &want);
            assert!(e < 1e-6, "forward g{g} c{c} m{m} {h}×{w}: rel err {e}");

            // Transposed: input has M channels, output C; kernel w'[c][m] = flip(w[m][c]).
            let dy: Vec<f32> = (0..g * m * h * w).map(|_| rng.normal()).collect();
            let mut wf = vec![0.0f32; c * m * 9];
            for mi in 0..m {
                for ci in 0..c {
                    for k in 0..9 {
                        wf[(ci * m + mi) * 9 + k] = wt[(mi * c + ci) * 9 + 8 - k];
                    }
                }
            }
            transform_weights(&wt, m, c, true, &mut u);
            let mut dx = vec![f32::NAN; g * c * h * w];
            let transposed = Group {
                g,
                c: m,
                h,
                w,
                m: c,
            };
            conv(&dy, transposed, &u, &mut dx, None, &mut wk, 2);
            let want = direct(&dy, g, m, h, w, c, &wf);
            let e = rel_err(&dx, &want);
            assert!(e < 1e-6, "transposed g{g} c{c} m{m} {h}×{w}: rel err {e}");

            // ∇W[m][c][i][j] = Σ_{y,x} ∇Y[m][y][x] · x[c][y + i − 1][x + j − 1], in two halves of the batch.
            let mut want = vec![0.0f64; m * c * 9];
            for i in 0..g {
                for mi in 0..m {
                    for ci in 0..c {
                        for k in 0..9 {
                            let (ki, kj) = (k / 3, k % 3);
                            let mut s = 0.0f64;
                            for oy in 0..h {
                                for ox in 0..w {
                                    let (iy, ix) = (oy + ki, ox + kj);
                                    if iy == 0 || ix == 0 || iy > h || ix > w {
                                        continue;
                                    }
                                    s += dy[((i * m + mi) * h + oy) * w + ox] as f64
                                        * x[((i * c + ci) * h + iy - 1) * w + ix - 1] as f64;
                                }
                            }
                            want[(mi * c + ci) * 9 + k] += s;
                        }
                    }
                }
            }
            let half = g / 2;
            let (xl, yl) = (c * h * w, m * h * w);
            let mut wk2 = Work::default();
            let first = Group {
                g: half,
                c,
                h,
                w,
                m,
            };
            let rest = Group {
                g: g - half,
                ..first
            };
            grad_weights(&x, &dy, first, &mut wk, false, 1);
            grad_weights(&x[half * xl..], &dy[half * yl..], rest, &mut wk2, false, 1);
            if half > 0 {
                // a second group into the same worker's sum
                grad_weights(&x[half * xl..], &dy[half * yl..], rest, &mut wk, true, 2);
                wk.du.iter_mut().zip(&wk2.du).for_each(|(a, b)| *a -= b);
            }
            let mut dw = vec![1.0f32; m * c * 9];
            finish_grad(&[&wk.du, &wk2.du], m, c, &mut dw);
            dw.iter_mut().for_each(|v| *v -= 1.0);
            let e = rel_err(&dw, &want);
            assert!(e < 1e-5, "∇W g{g} c{c} m{m} {h}×{w}: rel err {e}");
        }
    }
}
