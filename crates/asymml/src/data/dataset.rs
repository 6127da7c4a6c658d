//! The in-memory [`Dataset`] (u8 NCHW), batch filling with normalisation and augmentation, and resizing.

use asymml_core::rng::Rng;
use rayon::prelude::*;

/// A labelled image set held as `u8` NCHW.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// `n * c * h * w` bytes, image after image, each channel plane after plane.
    pub(crate) images: Vec<u8>,
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    /// One label per image, each below `num_classes`.
    pub(crate) labels: Vec<u32>,
    pub(crate) num_classes: usize,
    /// `num_classes` names, in label order.
    pub(crate) class_names: Vec<String>,
    /// Per-channel normalisation constants in 0..1 units: a pixel `x` becomes `(x / 255 - mean) / std`.
    pub(crate) mean: Vec<f32>,
    pub(crate) std: Vec<f32>,
}

/// Training-time augmentation, as torchvision's `RandomCrop(size, padding=pad)` followed by
/// `RandomHorizontalFlip(p=0.5)` when `hflip` is set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Augment {
    /// Zero padding on each side before a random crop of the original size (0: no crop).
    pub(crate) pad: usize,
    /// Mirror left-right with probability 0.5.
    pub(crate) hflip: bool,
}

/// A seeded random permutation of `0..n`, the order of one epoch.
pub(crate) fn epoch_order(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    order
}

/// Normalises one CHW `u8` image (e.g. from [`super::load_image`]) into `out` with per-channel `mean`/`std`.
///
/// # Panics
/// If `out.len() != img.len()`, or `img.len()` is not a multiple of `mean.len()`.
pub(crate) fn normalize_into(img: &[u8], mean: &[f32], std: &[f32], out: &mut [f32]) {
    assert_eq!(out.len(), img.len(), "normalize_into: output length");
    assert_eq!(img.len() % mean.len(), 0, "normalize_into: channel count");
    let plane = img.len() / mean.len();
    for (ch, lut) in luts(mean, std).iter().enumerate() {
        let range = ch * plane..(ch + 1) * plane;
        for (o, &x) in out[range.clone()].iter_mut().zip(&img[range]) {
            *o = lut[x as usize];
        }
    }
}

/// One lookup table per channel: `lut[c][x] = (x / 255 - mean[c]) / std[c]`.
fn luts(mean: &[f32], std: &[f32]) -> Vec<[f32; 256]> {
    mean.iter()
        .zip(std)
        .map(|(&m, &s)| std::array::from_fn(|x| (x as f32 / 255.0 - m) / s))
        .collect()
}

/// Where one sample's pixels come from: output (y, x) reads source (y + dy, mirror(x) + dx), zero outside.
#[derive(Clone, Copy)]
struct View {
    index: usize,
    dy: isize,
    dx: isize,
    flip: bool,
}

impl Dataset {
    /// The number of images.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Bytes (and `f32` values in a batch) per image: `c * h * w`.
    pub(crate) fn image_len(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Image `i` as CHW bytes.
    pub fn image(&self, i: usize) -> &[u8] {
        let len = self.image_len();
        &self.images[i * len..(i + 1) * len]
    }

    /// A new dataset holding the images at `indices`, in that order.
    pub(crate) fn select(&self, indices: &[usize]) -> Dataset {
        Dataset {
            images: indices
                .iter()
                .flat_map(|&i| self.image(i))
                .copied()
                .collect(),
            n: indices.len(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            class_names: self.class_names.clone(),
            mean: self.mean.clone(),
            std: self.std.clone(),
            ..*self
        }
    }

    /// Writes the images at `indices` as normalised `f32` NCHW into `out`, augmented with `aug` if given (random
    /// draws from `rng`, in index order, so a batch is reproduced by the generator's state), and their labels
    /// into `labels` (cleared first).
    ///
    /// # Panics
    /// If `out.len() != indices.len() * self.image_len()` or an index is out of range.
    pub(crate) fn fill_batch(
        &self,
        indices: &[usize],
        aug: Option<&Augment>,
        rng: &mut Rng,
        out: &mut [f32],
        labels: &mut Vec<usize>,
    ) {
        let len = self.image_len();
        assert_eq!(out.len(), indices.len() * len, "fill_batch: output length");
        let views: Vec<View> = indices
            .iter()
            .map(|&index| {
                let mut view = View {
                    index,
                    dy: 0,
                    dx: 0,
                    flip: false,
                };
                if let Some(a) = aug {
                    if a.pad > 0 {
                        view.dy = rng.below(2 * a.pad + 1) as isize - a.pad as isize;
                        view.dx = rng.below(2 * a.pad + 1) as isize - a.pad as isize;
                    }
                    view.flip = a.hflip && rng.uniform() < 0.5;
                }
                view
            })
            .collect();
        let luts = luts(&self.mean, &self.std);
        let min_len = (16384 / len.max(1)).max(1);
        out.par_chunks_mut(len.max(1))
            .zip(views.par_iter())
            .with_min_len(min_len)
            .for_each(|(dst, view)| self.write_view(view, &luts, dst));
        labels.clear();
        labels.extend(indices.iter().map(|&i| self.labels[i] as usize));
    }

    fn write_view(&self, v: &View, luts: &[[f32; 256]], dst: &mut [f32]) {
        let (h, w) = (self.h, self.w);
        let src = self.image(v.index);
        for (ch, lut) in luts.iter().enumerate() {
            let plane = &src[ch * h * w..(ch + 1) * h * w];
            for y in 0..h {
                let row = &mut dst[(ch * h + y) * w..(ch * h + y + 1) * w];
                let sy = y as isize + v.dy;
                if sy < 0 || sy >= h as isize {
                    row.fill(lut[0]);
                    continue;
                }
                let srow = &plane[sy as usize * w..(sy as usize + 1) * w];
                for (x, o) in row.iter_mut().enumerate() {
                    let sx = if v.flip { w - 1 - x } else { x } as isize + v.dx;
                    *o = if sx >= 0 && sx < w as isize {
                        lut[srow[sx as usize] as usize]
                    } else {
                        lut[0]
                    };
                }
            }
        }
    }

    /// A copy with every image bilinearly resized to `size`×`size` (half-pixel centres, as PyTorch's
    /// `interpolate(mode="bilinear", align_corners=False)`), for a model whose input size differs from the data's.
    pub(crate) fn resize_to(&self, size: usize) -> Dataset {
        if (self.h, self.w) == (size, size) || self.h == 0 || self.w == 0 {
            return self.clone();
        }
        let dst_plane = size * size;
        let xs: Vec<_> = (0..size).map(|x| axis(x, self.w, size)).collect();
        let ys: Vec<_> = (0..size).map(|y| axis(y, self.h, size)).collect();
        let mut images = vec![0u8; self.n * self.c * dst_plane];
        images
            .par_chunks_mut(dst_plane)
            .zip(self.images.par_chunks(self.h * self.w))
            .with_min_len(64)
            .for_each(|(dst, src)| {
                for (drow, &(y0, y1, fy)) in dst.chunks_mut(size).zip(&ys) {
                    let (r0, r1) = (&src[y0 * self.w..], &src[y1 * self.w..]);
                    for (d, &(x0, x1, fx)) in drow.iter_mut().zip(&xs) {
                        let top = r0[x0] as f32 * (1.0 - fx) + r0[x1] as f32 * fx;
                        let bottom = r1[x0] as f32 * (1.0 - fx) + r1[x1] as f32 * fx;
                        *d = (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8;
                    }
                }
            });
        Dataset {
            images,
            h: size,
            w: size,
            labels: self.labels.clone(),
            class_names: self.class_names.clone(),
            mean: self.mean.clone(),
            std: self.std.clone(),
            ..*self
        }
    }
}

/// Source taps and weight for output coordinate `o` when `n` source samples map onto `out` outputs.
fn axis(o: usize, n: usize, out: usize) -> (usize, usize, f32) {
    let s = ((o as f32 + 0.5) * n as f32 / out as f32 - 0.5).max(0.0);
    let i0 = (s as usize).min(n - 1);
    (i0, (i0 + 1).min(n - 1), s - i0 as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` images of `c`×`h`×`w` with varied non-zero pixels; labels cycle through 3 classes.
    fn toy(c: usize, h: usize, w: usize, n: usize) -> Dataset {
        Dataset {
            images: (0..n * c * h * w)
                .map(|i| (i * 7 % 251) as u8 + 1)
                .collect(),
            n,
            c,
            h,
            w,
            labels: (0..n as u32).map(|i| i % 3).collect(),
            num_classes: 3,
            class_names: vec!["a".into(), "b".into(), "c".into()],
            mean: (0..c).map(|i| 0.1 * (i + 1) as f32).collect(),
            std: (0..c).map(|i| 0.2 * (i + 1) as f32).collect(),
        }
    }

    fn raw(ds: &Dataset, out: &[f32]) -> Vec<u8> {
        let plane = ds.h * ds.w;
        out.iter()
            .enumerate()
            .map(|(i, &v)| {
                let ch = i / plane % ds.c;
                ((v * ds.std[ch] + ds.mean[ch]) * 255.0).round() as u8
            })
            .collect()
    }

    #[test]
    fn normalisation_values() {
        let mut ds = toy(3, 2, 2, 1);
        ds.images[..4].copy_from_slice(&[0, 255, 51, 102]);
        let mut out = vec![0.0; 12];
        let mut labels = vec![99];
        ds.fill_batch(&[0], None, &mut Rng::new(1), &mut out, &mut labels);
        assert_eq!(labels, vec![0]);
        let expect = [
            (0.0 - 0.1) / 0.2,
            (1.0 - 0.1) / 0.2,
            (0.2 - 0.1) / 0.2,
            (0.4 - 0.1) / 0.2,
        ];
        for (o, e) in out[..4].iter().zip(expect) {
            assert!((o - e).abs() < 1e-5, "{o} vs {e}");
        }
        for (i, &o) in out.iter().enumerate() {
            let ch = i / 4;
            let e = (ds.images[i] as f32 / 255.0 - ds.mean[ch]) / ds.std[ch];
            assert!((o - e).abs() < 1e-5);
        }
        let mut single = vec![0.0; 12];
        normalize_into(ds.image(0), &ds.mean, &ds.std, &mut single);
        assert_eq!(single, out);
    }

    #[test]
    fn hflip_gives_identity_or_mirror() {
        let ds = toy(2, 4, 3, 2);
        let idx = [1usize; 64];
        let mut out = vec![0.0; 64 * ds.image_len()];
        let mut labels = Vec::new();
        let aug = Augment {
            pad: 0,
            hflip: true,
        };
        ds.fill_batch(&idx, Some(&aug), &mut Rng::new(3), &mut out, &mut labels);
        assert_eq!(labels, vec![1; 64]);
        let orig = ds.image(1).to_vec();
        let mirror: Vec<u8> = orig
            .chunks(3)
            .flat_map(|r| r.iter().rev().copied())
            .collect();
        let (mut same, mut flipped) = (0, 0);
        for chunk in out.chunks(ds.image_len()) {
            let got = raw(&ds, chunk);
            if got == orig {
                same += 1;
            } else {
                assert_eq!(got, mirror);
                flipped += 1;
            }
        }
        assert!(same > 10 && flipped > 10, "{same} {flipped}");
    }

    #[test]
    fn crop_is_a_zero_padded_shift() {
        let ds = toy(1, 5, 6, 3);
        let idx: Vec<usize> = (0..60).map(|i| i % 3).collect();
        let mut out = vec![0.0; idx.len() * ds.image_len()];
        let aug = Augment {
            pad: 2,
            hflip: false,
        };
        ds.fill_batch(
            &idx,
            Some(&aug),
            &mut Rng::new(9),
            &mut out,
            &mut Vec::new(),
        );
        let mut shifts = std::collections::HashSet::new();
        for (chunk, &i) in out.chunks(ds.image_len()).zip(&idx) {
            assert_eq!(chunk.len(), 30);
            let got = raw(&ds, chunk);
            let src = ds.image(i);
            let shifted = |dy: isize, dx: isize| -> Vec<u8> {
                (0..30)
                    .map(|p| {
                        let (y, x) = ((p / 6) as isize + dy, (p % 6) as isize + dx);
                        if (0..5).contains(&y) && (0..6).contains(&x) {
                            src[(y * 6 + x) as usize]
                        } else {
                            0
                        }
                    })
                    .collect()
            };
            let found = (-2..=2)
                .flat_map(|dy| (-2..=2).map(move |dx| (dy, dx)))
                .find(|&(dy, dx)| shifted(dy, dx) == got);
            shifts.insert(found.expect("output is not a padded shift of its source"));
        }
        assert!(shifts.len() > 5, "{shifts:?}");
        // Same seed, same batch.
        let mut again = vec![0.0; out.len()];
        ds.fill_batch(
            &idx,
            Some(&aug),
            &mut Rng::new(9),
            &mut again,
            &mut Vec::new(),
        );
        assert_eq!(again, out);
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(100, &mut Rng::new(4));
        assert_eq!(a, epoch_order(100, &mut Rng::new(4)));
        assert_ne!(a, epoch_order(100, &mut Rng::new(5)));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn resize_and_select() {
        let mut ds = toy(2, 28, 28, 3);
        ds.images.fill(77);
        let big = ds.resize_to(32);
        assert_eq!((big.n, big.c, big.h, big.w), (3, 2, 32, 32));
        assert_eq!(big.images.len(), 3 * 2 * 32 * 32);
        assert!(big.images.iter().all(|&v| v == 77));
        assert_eq!(big.labels, ds.labels);
        assert_eq!(ds.resize_to(28), ds);
        // A horizontal ramp stays a monotone ramp with the same ends.
        let mut ramp = toy(1, 2, 4, 1);
        ramp.images = vec![0, 85, 170, 255, 0, 85, 170, 255];
        let r = ramp.resize_to(8);
        let row = &r.images[..8];
        assert!(row.windows(2).all(|p| p[0] <= p[1]), "{row:?}");
        assert_eq!((row[0], row[7]), (0, 255));
        assert_eq!(&r.images[8..16], row);
        let s = ds.select(&[2, 0]);
        assert_eq!((s.n, s.labels.clone()), (2, vec![2, 0]));
        assert_eq!(s.image(0), ds.image(2));
    }
}
