//! ImageFolder trees (one sub-folder of .png/.jpg/.jpeg files per class, as torchvision's `ImageFolder`) and
//! single-image loading for inference.

use std::path::{Path, PathBuf};

use asymml_core::rng::Rng;
use image::imageops::FilterType;
use image::{DynamicImage, ImageReader, Limits};
use rayon::prelude::*;

use super::{check_images_bytes, io_error, require_dir, DataError, Dataset, Result};

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];
/// How deep sub-folders are followed (a guard against symlink loops).
const MAX_DEPTH: usize = 32;
/// Share of each class held out as test when the folder has no `train/` + `test/` (or `val/`) split.
const HOLD_OUT: f64 = 0.2;

/// ImageNet statistics for RGB.
const RGB_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const RGB_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// For grey images there is no standard: 0.5 / 0.25 maps typical pixels to about [-2, 2].
const GREY_MEAN: f32 = 0.5;
const GREY_STD: f32 = 0.25;

/// Largest width and height of an image that is decoded: a header claiming more is refused before decoding.
pub(crate) const MAX_IMAGE_SIDE: u32 = 16_384;
/// Most memory the decoder of one image may allocate (the decoded pixels included).
pub(crate) const MAX_IMAGE_ALLOC: u64 = 512 << 20;

/// A reader of the image at `path` (format from its content) under [`MAX_IMAGE_SIDE`] and
/// [`MAX_IMAGE_ALLOC`]; the file is read as the decoder needs it.
fn limited_reader(path: &Path) -> Result<ImageReader<std::io::BufReader<std::fs::File>>> {
    let mut reader = ImageReader::open(path)
        .map_err(|e| io_error(path, "image file", e))?
        .with_guessed_format()
        .map_err(|e| io_error(path, "image file", e))?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    reader.limits(limits);
    Ok(reader)
}

/// A decoding error of the image at `path`; one beyond the limits states them.
fn image_error(path: &Path, e: image::ImageError) -> DataError {
    let msg = match e {
        image::ImageError::Limits(l) => format!(
            "{l} (at most {MAX_IMAGE_SIDE}×{MAX_IMAGE_SIDE} px and {} MiB decoded)",
            MAX_IMAGE_ALLOC >> 20
        ),
        e => e.to_string(),
    };
    DataError::Image {
        path: path.to_path_buf(),
        msg,
    }
}

/// The width and height in the header of the image at `path`, without decoding it; a header above
/// [`MAX_IMAGE_SIDE`] is an error.
pub(crate) fn image_dimensions(path: &Path) -> Result<(u32, u32)> {
    limited_reader(path)?
        .into_dimensions()
        .map_err(|e| image_error(path, e))
}

/// Loads `(train, test)` from an image folder, every image converted to `channels` (3: RGB, 1: luma) and to
/// `size`×`size` (shorter side resized to `size`, then centre-cropped).
///
/// If `dir` holds `train/` and `test/` (or else `val/`), those are the splits and must have the same class
/// folders. Otherwise `dir` itself holds the class folders, and a seeded 20 % of each class (at least one image
/// when the class has two or more) is held out as test. Class names are the sorted folder names, in label
/// order; hidden files and folders (names starting with '.') are skipped. Normalisation: ImageNet mean/std for
/// RGB, 0.5/0.25 for grey.
pub(crate) fn load_folder(
    dir: &Path,
    channels: usize,
    size: usize,
    seed: u64,
) -> Result<(Dataset, Dataset)> {
    check_shape(channels, size)?;
    require_dir(dir, "image folder")?;
    let train_dir = dir.join("train");
    let test_dir = ["test", "val"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_dir());
    let (names, train, test) = match test_dir {
        Some(test_dir) if train_dir.is_dir() => {
            let train = scan_classes(&train_dir)?;
            let test = scan_classes(&test_dir)?;
            let names: Vec<String> = train.iter().map(|(n, _)| n.clone()).collect();
            let test_names: Vec<String> = test.iter().map(|(n, _)| n.clone()).collect();
            if names != test_names {
                return Err(DataError::ClassMismatch {
                    train_dir,
                    test_dir,
                    train: names,
                    test: test_names,
                });
            }
            (names, labelled(train), labelled(test))
        }
        _ => {
            let classes = scan_classes(dir)?;
            let names = classes.iter().map(|(n, _)| n.clone()).collect();
            let mut rng = Rng::new(seed);
            let (mut train, mut test) = (Vec::new(), Vec::new());
            for (label, (_, mut files)) in classes.into_iter().enumerate() {
                rng.shuffle(&mut files);
                let n = files.len();
                let n_test = if n < 2 {
                    0
                } else {
                    ((n as f64 * HOLD_OUT).round() as usize).max(1)
                };
                let mut rest = files.split_off(n_test);
                files.sort();
                rest.sort();
                test.extend(files.into_iter().map(|p| (p, label as u32)));
                train.extend(rest.into_iter().map(|p| (p, label as u32)));
            }
            (names, train, test)
        }
    };
    Ok((
        decode_all(&train, &names, channels, size)?,
        decode_all(&test, &names, channels, size)?,
    ))
}

/// Loads one image as CHW `u8`: decoded (format from its content), converted to `channels` (3: RGB, 1: luma),
/// resized (triangle filter) so the shorter side is `size`, and centre-cropped to `size`×`size` — as
/// torchvision's `Resize(size)` + `CenterCrop(size)`.
pub(crate) fn load_image(path: &Path, channels: usize, size: usize) -> Result<Vec<u8>> {
    check_shape(channels, size)?;
    let img = limited_reader(path)?
        .decode()
        .map_err(|e| image_error(path, e))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(DataError::Image {
            path: path.to_path_buf(),
            msg: "the image has no pixels".into(),
        });
    }
    let img = match channels {
        1 => DynamicImage::ImageLuma8(img.to_luma8()),
        _ => DynamicImage::ImageRgb8(img.to_rgb8()),
    };
    let (nw, nh) = if w <= h {
        (size, (size * h / w).max(size))
    } else {
        ((size * w / h).max(size), size)
    };
    let img = if (nw, nh) == (w, h) {
        img
    } else {
        img.resize_exact(nw as u32, nh as u32, FilterType::Triangle)
    };
    let (left, top) = ((nw - size) / 2, (nh - size) / 2);
    let hwc = img
        .crop_imm(left as u32, top as u32, size as u32, size as u32)
        .into_bytes();
    Ok((0..channels)
        .flat_map(|ch| hwc.iter().skip(ch).step_by(channels).copied())
        .collect())
}

/// The images to run inference on: a file is itself; a folder gives its .png/.jpg/.jpeg files (recursively,
/// sorted), and must hold at least one.
pub(crate) fn list_images(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    images_in(
        path,
        "image file or folder",
        "no .png/.jpg/.jpeg images in this folder",
    )
}

fn check_shape(channels: usize, size: usize) -> Result<()> {
    if !matches!(channels, 1 | 3) || size == 0 {
        return Err(DataError::InvalidArgument(format!(
            "images need 1 or 3 channels and a size above 0 (got {channels} channels, size {size})"
        )));
    }
    Ok(())
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// The visible entries of a folder.
fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_error(dir, "folder", e))? {
        let path = entry.map_err(|e| io_error(dir, "folder", e))?.path();
        if !is_hidden(&path) {
            out.push(path);
        }
    }
    Ok(out)
}

fn collect_images(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    for path in entries(dir)? {
        if path.is_dir() {
            if depth < MAX_DEPTH {
                collect_images(&path, depth + 1, out)?;
            }
        } else if is_image(&path) && path.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// The image files under `dir`, sorted; `missing`/`empty` describe the faults.
fn images_in(dir: &Path, missing: &'static str, empty: &'static str) -> Result<Vec<PathBuf>> {
    require_dir(dir, missing)?;
    let mut files = Vec::new();
    collect_images(dir, 0, &mut files)?;
    if files.is_empty() {
        return Err(DataError::Empty {
            path: dir.to_path_buf(),
            what: empty,
        });
    }
    files.sort();
    Ok(files)
}

/// The class folders of `dir`, sorted by name, each with its image files.
fn scan_classes(dir: &Path) -> Result<Vec<(String, Vec<PathBuf>)>> {
    require_dir(dir, "image folder")?;
    let mut dirs: Vec<PathBuf> = entries(dir)?.into_iter().filter(|p| p.is_dir()).collect();
    dirs.sort();
    if dirs.is_empty() {
        return Err(DataError::Empty {
            path: dir.to_path_buf(),
            what: "no class folders (expected one sub-folder of images per class)",
        });
    }
    dirs.into_iter()
        .map(|d| {
            let files = images_in(
                &d,
                "class folder",
                "class folder holds no .png/.jpg/.jpeg images",
            )?;
            let name = d
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok((name, files))
        })
        .collect()
}

fn labelled(classes: Vec<(String, Vec<PathBuf>)>) -> Vec<(PathBuf, u32)> {
    classes
        .into_iter()
        .enumerate()
        .flat_map(|(label, (_, files))| files.into_iter().map(move |p| (p, label as u32)))
        .collect()
}

/// Decodes `entries` in parallel into one dataset.
fn decode_all(
    entries: &[(PathBuf, u32)],
    names: &[String],
    channels: usize,
    size: usize,
) -> Result<Dataset> {
    check_images_bytes(entries.len(), channels, size)?;
    let len = channels * size * size;
    let mut images = vec![0u8; entries.len() * len];
    images
        .par_chunks_mut(len)
        .zip(entries.par_iter())
        .try_for_each(|(dst, (path, _))| {
            dst.copy_from_slice(&load_image(path, channels, size)?);
            Ok::<(), DataError>(())
        })?;
    let (mean, std) = match channels {
        1 => (vec![GREY_MEAN], vec![GREY_STD]),
        _ => (RGB_MEAN.to_vec(), RGB_STD.to_vec()),
    };
    Ok(Dataset {
        images,
        n: entries.len(),
        c: channels,
        h: size,
        w: size,
        labels: entries.iter().map(|(_, l)| *l).collect(),
        num_classes: names.len(),
        class_names: names.to_vec(),
        mean,
        std,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    /// Writes `dir/class/name` as a `w`×`h` PNG (or JPEG, by extension) whose red value is `v`.
    fn write_image(dir: &Path, class: &str, name: &str, w: u32, h: u32, v: u8) -> PathBuf {
        let d = dir.join(class);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        RgbImage::from_fn(w, h, |x, _| Rgb([v, (x * 10) as u8, 200]))
            .save(&p)
            .unwrap();
        p
    }

    #[test]
    fn flat_folder_holds_out_a_seeded_fifth() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..5 {
            write_image(dir.path(), "dog", &format!("{i}.png"), 8, 6, 10 + i);
            write_image(dir.path(), "cat", &format!("{i}.PNG"), 6, 8, 100 + i);
        }
        write_image(dir.path(), "cat", "big.JPG", 12, 12, 150);
        std::fs::write(dir.path().join("cat/notes.txt"), "not an image").unwrap();
        std::fs::write(dir.path().join("README"), "ignored").unwrap();
        let (train, test) = load_folder(dir.path(), 3, 4, 7).unwrap();
        assert_eq!(train.class_names, vec!["cat", "dog"]);
        assert_eq!((train.n, test.n), (9, 2));
        assert_eq!((train.c, train.h, train.w), (3, 4, 4));
        assert_eq!(train.labels.iter().filter(|&&l| l == 0).count(), 5);
        assert_eq!(test.labels.iter().filter(|&&l| l == 1).count(), 1);
        assert_eq!(train.mean, RGB_MEAN.to_vec());
        // Labels follow the red value written per class (JPEG is lossy, so a tolerance).
        for ds in [&train, &test] {
            for i in 0..ds.n {
                let red = ds.image(i)[0];
                let range = if ds.labels[i] == 0 { 95..160 } else { 5..20 };
                assert!(range.contains(&red), "label {} red {red}", ds.labels[i]);
            }
        }
        let (train2, test2) = load_folder(dir.path(), 3, 4, 7).unwrap();
        assert_eq!((train2, test2), (train, test));
        let (grey, _) = load_folder(dir.path(), 1, 5, 7).unwrap();
        assert_eq!(
            (grey.c, grey.h, grey.mean.clone(), grey.std.clone()),
            (1, 5, vec![0.5], vec![0.25])
        );
    }

    #[test]
    fn train_and_val_splits() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_image(&d.join("train"), "a", "1.png", 4, 4, 1);
        write_image(&d.join("train"), "b", "1.png", 4, 4, 2);
        write_image(&d.join("train"), "b", "2.png", 4, 4, 3);
        write_image(&d.join("val"), "a", "1.png", 4, 4, 4);
        write_image(&d.join("val"), "b", "1.png", 4, 4, 5);
        let (train, test) = load_folder(d, 3, 4, 0).unwrap();
        assert_eq!(
            (train.labels.clone(), test.labels.clone()),
            (vec![0, 1, 1], vec![0, 1])
        );
        assert_eq!(test.image(1)[0], 5);
        write_image(&d.join("val"), "c", "1.png", 4, 4, 6);
        let e = load_folder(d, 3, 4, 0).unwrap_err().to_string();
        assert!(
            e.contains("class folders differ") && e.contains("\"c\""),
            "{e}"
        );
    }

    #[test]
    fn resize_then_centre_crop() {
        let dir = tempfile::tempdir().unwrap();
        // 20×10: left half black, right half white; the shorter side is already 10, so only the crop acts.
        let p = dir.path().join("halves.png");
        image::GrayImage::from_fn(20, 10, |x, _| image::Luma([if x < 10 { 0 } else { 255 }]))
            .save(&p)
            .unwrap();
        let img = load_image(&p, 1, 10).unwrap();
        assert_eq!(img.len(), 100);
        for row in img.chunks(10) {
            assert_eq!(row, [0, 0, 0, 0, 0, 255, 255, 255, 255, 255]);
        }
        // Solid colour survives resizing; planes come out as CHW.
        let p = write_image(dir.path(), "x", "solid.png", 1, 1, 0);
        RgbImage::from_pixel(30, 17, Rgb([255, 0, 9]))
            .save(&p)
            .unwrap();
        let img = load_image(&p, 3, 8).unwrap();
        assert_eq!(img.len(), 3 * 64);
        assert!(img[..64].iter().all(|&v| v == 255) && img[64..128].iter().all(|&v| v == 0));
        assert!(img[128..].iter().all(|&v| v == 9));
        let e = load_image(&p, 2, 8).unwrap_err().to_string();
        assert!(e.contains("1 or 3 channels"), "{e}");
    }

    #[test]
    fn list_images_of_file_and_folder() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_image(dir.path(), "z", "a.png", 2, 2, 0);
        let b = write_image(&dir.path().join("y"), "deep", "b.jpeg", 2, 2, 0);
        std::fs::write(dir.path().join("y/skip.bmp"), "x").unwrap();
        assert_eq!(list_images(&a).unwrap(), vec![a.clone()]);
        assert_eq!(list_images(dir.path()).unwrap(), vec![b, a]);
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let e = list_images(&empty).unwrap_err().to_string();
        assert!(
            e.contains("empty") && e.contains("no .png/.jpg/.jpeg images"),
            "{e}"
        );
        let e = list_images(&dir.path().join("gone"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not found") && e.contains("gone"), "{e}");
    }

    #[test]
    fn folder_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let e = load_folder(&d.join("gone"), 3, 8, 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("image folder not found") && e.contains("gone"),
            "{e}"
        );
        let e = load_folder(d, 3, 8, 0).unwrap_err().to_string();
        assert!(e.contains("no class folders"), "{e}");
        write_image(d, "good", "1.png", 4, 4, 0);
        std::fs::create_dir(d.join("hollow")).unwrap();
        std::fs::write(d.join("hollow/readme.txt"), "x").unwrap();
        let e = load_folder(d, 3, 8, 0).unwrap_err().to_string();
        assert!(
            e.contains("hollow") && e.contains("class folder holds no"),
            "{e}"
        );
        std::fs::remove_dir_all(d.join("hollow")).unwrap();
        std::fs::write(d.join("good/broken.png"), b"\x89PNG garbage, not an image").unwrap();
        let e = load_folder(d, 3, 8, 0).unwrap_err().to_string();
        assert!(
            e.contains("cannot decode image") && e.contains("broken.png"),
            "{e}"
        );
        let e = load_image(&d.join("good/broken.png"), 3, 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("broken.png"), "{e}");
        let e = load_image(&d.join("good/none.png"), 3, 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("image file not found"), "{e}");
    }
}
