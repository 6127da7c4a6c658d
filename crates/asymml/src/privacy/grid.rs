//! PNG grids of images: one row per private image, one column per view (the image, X_T, X_U, the
//! reconstructions), each tile scaled up to at least 64 px.

use super::attack::PixelScale;
use anyhow::{Context, Result};
use asymml_core::Tensor;
use image::{Rgb, RgbImage};
use std::path::Path;

/// One tile: `c` channel planes of h × w values; 1 channel is grey, 3 are RGB; any other count is shown as
/// the channel mean.
struct Tile {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
    /// Stretch min..max to 0..1 (for streams whose values are not pixels); else clamp to 0..1.
    pub stretch: bool,
}

impl Tile {
    /// The RGB value at (i, j) of the tile resized to `size` × `size` (nearest neighbour).
    fn rgb(&self, i: usize, j: usize, size: usize, lo: f32, hi: f32) -> Rgb<u8> {
        let (si, sj) = (i * self.h / size, j * self.w / size);
        let hw = self.h * self.w;
        let at = |ch: usize| self.data[ch * hw + si * self.w + sj];
        let v = |x: f32| {
            let u = if self.stretch && hi > lo {
                (x - lo) / (hi - lo)
            } else {
                x
            };
            (u.clamp(0.0, 1.0) * 255.0).round() as u8
        };
        match self.c {
            3 => Rgb([v(at(0)), v(at(1)), v(at(2))]),
            1 => {
                let g = v(at(0));
                Rgb([g, g, g])
            }
            c => {
                let g = v((0..c).map(at).sum::<f32>() / c as f32);
                Rgb([g, g, g])
            }
        }
    }

    fn range(&self) -> (f32, f32) {
        let hw = self.h * self.w;
        let vals: Vec<f32> = if self.c == 1 || self.c == 3 {
            self.data.clone()
        } else {
            (0..hw)
                .map(|p| (0..self.c).map(|ch| self.data[ch * hw + p]).sum::<f32>() / self.c as f32)
                .collect()
        };
        let lo = vals.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        (lo, hi)
    }
}

/// Writes rows of tiles as a PNG with 4 px gaps.
fn write_grid(path: &Path, rows: &[Vec<Tile>]) -> Result<()> {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let side = rows
        .iter()
        .flatten()
        .map(|t| t.h.max(t.w))
        .max()
        .unwrap_or(1);
    let size = side * 64usize.div_ceil(side).max(1);
    let gap = 4;
    let (width, height) = (
        (cols * (size + gap) + gap) as u32,
        (rows.len() * (size + gap) + gap) as u32,
    );
    let mut img = RgbImage::from_pixel(width.max(1), height.max(1), Rgb([255, 255, 255]));
    for (r, row) in rows.iter().enumerate() {
        for (c, tile) in row.iter().enumerate() {
            if tile.h == 0 || tile.w == 0 || tile.data.len() < tile.c * tile.h * tile.w {
                continue;
            }
            let (lo, hi) = tile.range();
            let (x0, y0) = (gap + c * (size + gap), gap + r * (size + gap));
            for i in 0..size {
                for j in 0..size {
                    img.put_pixel(
                        (x0 + j) as u32,
                        (y0 + i) as u32,
                        tile.rgb(i, j, size, lo, hi),
                    );
                }
            }
        }
    }
    img.save(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// The image-grid PNG of one attack: per attacked image (up to 6), the image, X_T = X − X_U, X_U and each
/// decoder's reconstruction. `images`: the attacked images, `x` and `xu`: the attacked conv's input and X_U
/// for them.
pub(crate) fn write_attack_grid(
    path: &Path,
    images: &Tensor,
    x: &Tensor,
    xu: &Tensor,
    recons: &[(String, Tensor)],
    scale: &PixelScale,
) -> Result<()> {
    let n = images.shape[0].min(6);
    let tile = |t: &Tensor, i: usize, pixels: bool| -> Tile {
        let (c, h, w) = (t.shape[1], t.shape[2], t.shape[3]);
        let per = c * h * w;
        let raw = &t.data[i * per..][..per];
        Tile {
            c,
            h,
            w,
            data: if pixels {
                scale.to_unit(raw, c)
            } else {
                raw.to_vec()
            },
            stretch: !pixels,
        }
    };
    let mut grid_rows = Vec::new();
    for i in 0..n {
        let mut xt = x.clone();
        xt.data.iter_mut().zip(&xu.data).for_each(|(a, b)| *a -= b);
        let mut row = vec![
            tile(images, i, true),
            tile(&xt, i, xt.shape == images.shape),
            tile(xu, i, false),
        ];
        for (_, r) in recons {
            row.push(tile(r, i, true));
        }
        grid_rows.push(row);
    }
    write_grid(path, &grid_rows)
}

/// The edge grid of one X_U: per image (up to 6), the image, its edge map and X_U's best candidate edge map
/// (both at X_U's resolution; see `structure.rs`), and X_U's channel mean.
pub(crate) fn write_edge_grid(
    path: &Path,
    images: &Tensor,
    xu: &Tensor,
    scale: &PixelScale,
) -> Result<()> {
    let views = super::structure::edge_views(images, xu, 6)?;
    let (c, h, w) = (images.shape[1], images.shape[2], images.shape[3]);
    let (sc, sh, sw) = (xu.shape[1], xu.shape[2], xu.shape[3]);
    let mut rows = Vec::new();
    for (i, (target, best)) in views.into_iter().enumerate() {
        let img = &images.data[i * c * h * w..][..c * h * w];
        let s = &xu.data[i * sc * sh * sw..][..sc * sh * sw];
        let map = |data: Vec<f32>| Tile {
            c: 1,
            h: sh,
            w: sw,
            data,
            stretch: false,
        };
        rows.push(vec![
            Tile {
                c,
                h,
                w,
                data: scale.to_unit(img, c),
                stretch: false,
            },
            map(target),
            map(best),
            Tile {
                c: sc,
                h: sh,
                w: sw,
                data: s.to_vec(),
                stretch: true,
            },
        ]);
    }
    write_grid(path, &rows)
}
