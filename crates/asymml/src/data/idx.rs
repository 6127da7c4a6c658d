//! IDX files (MNIST, Fashion-MNIST), plain or gzipped, and the embedded Fashion-MNIST default.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{check_labels, read_file, require_dir, DataError, Dataset, Result};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;
/// Largest IDX file (header included, after decompression) whose dimensions are accepted: 4 GiB (the
/// MNIST training images are 47 MB).
const MAX_IDX_BYTES: u64 = 4 << 30;

const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

static EMBEDDED_IMAGES: &[u8] =
    include_bytes!("../../data/fashion-mnist/t10k-images-idx3-ubyte.gz");
static EMBEDDED_LABELS: &[u8] =
    include_bytes!("../../data/fashion-mnist/t10k-labels-idx1-ubyte.gz");

/// Which IDX dataset a folder holds; it decides class names and normalisation constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IdxKind {
    /// Digits "0".."9"; mean 0.1307, std 0.3081.
    Mnist,
    /// Ten clothing classes; mean 0.2860, std 0.3530.
    FashionMnist,
}

impl IdxKind {
    fn class_names(self) -> Vec<String> {
        match self {
            IdxKind::Mnist => (0..10).map(|d| d.to_string()).collect(),
            IdxKind::FashionMnist => FASHION_CLASSES.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn mean_std(self) -> (f32, f32) {
        match self {
            IdxKind::Mnist => (0.1307, 0.3081),
            IdxKind::FashionMnist => (0.2860, 0.3530),
        }
    }
}

/// Loads `(train, test)` from a folder holding `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
/// `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte`, each plain or gzipped (with or without `.gz`; gzip is
/// recognised by its magic bytes).
pub(crate) fn load_idx_dir(dir: &Path, kind: IdxKind) -> Result<(Dataset, Dataset)> {
    require_dir(dir, "data folder")?;
    let split = |prefix: &str| -> Result<Dataset> {
        let images = find_idx(
            dir,
            &format!("{prefix}-images-idx3-ubyte"),
            "IDX image file",
        )?;
        let labels = find_idx(
            dir,
            &format!("{prefix}-labels-idx1-ubyte"),
            "IDX label file",
        )?;
        let image_bytes = read_file(&images, "IDX image file")?;
        let label_bytes = read_file(&labels, "IDX label file")?;
        idx_dataset(&images, image_bytes, &labels, label_bytes, kind)
    };
    Ok((split("train")?, split("t10k")?))
}

/// The embedded Fashion-MNIST test set (10,000 images), split into the first 8,000 for training and the last
/// 2,000 for testing.
pub fn embedded_fashion_mnist() -> Result<(Dataset, Dataset)> {
    let all = idx_dataset(
        Path::new("<embedded>/t10k-images-idx3-ubyte.gz"),
        EMBEDDED_IMAGES.to_vec(),
        Path::new("<embedded>/t10k-labels-idx1-ubyte.gz"),
        EMBEDDED_LABELS.to_vec(),
        IdxKind::FashionMnist,
    )?;
    let cut = all.n * 4 / 5;
    let indices: Vec<usize> = (0..all.n).collect();
    Ok((all.select(&indices[..cut]), all.select(&indices[cut..])))
}

/// `dir/stem` or `dir/stem.gz`, whichever exists.
fn find_idx(dir: &Path, stem: &str, what: &'static str) -> Result<PathBuf> {
    [stem.to_string(), format!("{stem}.gz")]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| DataError::Missing {
            path: dir.join(format!("{stem}[.gz]")),
            what,
        })
}

/// Builds a dataset from the (possibly gzipped) bytes of an image file and a label file.
fn idx_dataset(
    images_path: &Path,
    images: Vec<u8>,
    labels_path: &Path,
    labels: Vec<u8>,
    kind: IdxKind,
) -> Result<Dataset> {
    let images = maybe_gunzip(images_path, images, IMAGES_MAGIC, 3)?;
    let (dims, pixels) = parse_idx(images_path, &images, IMAGES_MAGIC, 3)?;
    let labels = maybe_gunzip(labels_path, labels, LABELS_MAGIC, 1)?;
    let (label_dims, labels) = parse_idx(labels_path, &labels, LABELS_MAGIC, 1)?;
    let (n, h, w) = (dims[0], dims[1], dims[2]);
    if n != label_dims[0] {
        return Err(DataError::CountMismatch {
            images_path: images_path.to_path_buf(),
            labels_path: labels_path.to_path_buf(),
            images: n,
            labels: label_dims[0],
        });
    }
    if n == 0 || h == 0 || w == 0 {
        return Err(DataError::Empty {
            path: images_path.to_path_buf(),
            what: "IDX file holds no pixels (a dimension is 0)",
        });
    }
    let labels: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    check_labels(labels_path, &labels, 10)?;
    let (mean, std) = kind.mean_std();
    Ok(Dataset {
        images: pixels.to_vec(),
        n,
        c: 1,
        h,
        w,
        labels,
        num_classes: 10,
        class_names: kind.class_names(),
        mean: vec![mean],
        std: vec![std],
    })
}

/// Decompresses `bytes` if they start with the gzip magic (1f 8b); otherwise returns them as they are. The
/// IDX header is inflated first, and then at most the bytes its dimensions promise (and one more, to tell a
/// longer stream): a small file that would inflate to much more than it claims is refused after reading no
/// more than the claim.
fn maybe_gunzip(path: &Path, bytes: Vec<u8>, magic: u32, ndims: usize) -> Result<Vec<u8>> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    let corrupt = |e: std::io::Error| DataError::BadFormat {
        path: path.to_path_buf(),
        msg: format!("corrupt or truncated gzip data: {e}"),
    };
    let mut gz = flate2::read::MultiGzDecoder::new(&bytes[..]);
    let mut out = Vec::new();
    let header = 4 * (1 + ndims);
    (&mut gz)
        .take(header as u64)
        .read_to_end(&mut out)
        .map_err(corrupt)?;
    let (dims, expected) = idx_header(path, &out, magic, ndims)?;
    (&mut gz)
        .take((expected - header) as u64 + 1)
        .read_to_end(&mut out)
        .map_err(corrupt)?;
    if out.len() > expected {
        return Err(DataError::BadFormat {
            path: path.to_path_buf(),
            msg: format!(
                "the gzip data inflates to more than the {expected} bytes its IDX header promises (dimensions \
                 {dims:?})"
            ),
        });
    }
    Ok(out)
}

/// Reads an IDX header (big-endian `magic`, then `ndims` u32 dimensions) at the start of `bytes`; returns the
/// dimensions and the size of the whole file they imply (header included), at most [`MAX_IDX_BYTES`].
fn idx_header(path: &Path, bytes: &[u8], magic: u32, ndims: usize) -> Result<(Vec<usize>, usize)> {
    let header = 4 * (1 + ndims);
    let truncated = |expected: usize| DataError::Truncated {
        path: path.to_path_buf(),
        expected: expected as u64,
        actual: bytes.len() as u64,
    };
    let word = |i: usize| {
        u32::from_be_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ])
    };
    if bytes.len() < 4 {
        return Err(truncated(header));
    }
    if word(0) != magic {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            expected: magic,
            found: word(0),
        });
    }
    if bytes.len() < header {
        return Err(truncated(header));
    }
    let dims: Vec<usize> = (1..=ndims).map(|i| word(i) as usize).collect();
    let too_large = || DataError::BadFormat {
        path: path.to_path_buf(),
        msg: format!(
            "IDX dimensions {dims:?} are too large (at most {} GiB of data)",
            MAX_IDX_BYTES >> 30
        ),
    };
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|body| body.checked_add(header))
        .ok_or_else(too_large)?;
    if expected as u64 > MAX_IDX_BYTES {
        return Err(too_large());
    }
    Ok((dims, expected))
}

/// Checks an IDX file's header against its size and returns the dimensions and the data after the header.
fn parse_idx<'a>(
    path: &Path,
    bytes: &'a [u8],
    magic: u32,
    ndims: usize,
) -> Result<(Vec<usize>, &'a [u8])> {
    let (dims, expected) = idx_header(path, bytes, magic, ndims)?;
    match bytes.len() {
        len if len < expected => Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: expected as u64,
            actual: len as u64,
        }),
        len if len > expected => Err(DataError::BadFormat {
            path: path.to_path_buf(),
            msg: format!(
                "{} unexpected bytes after the data (dimensions {dims:?} need {expected} bytes)",
                len - expected
            ),
        }),
        _ => Ok((dims, &bytes[4 * (1 + ndims)..])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx_bytes(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend(d.to_be_bytes());
        }
        v.extend(data);
        v
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    /// A folder with 3 train images (plain files) and 2 test images (gzipped, named `.gz`), 4×5 pixels.
    fn write_set(dir: &Path) {
        let img = |n: u32| {
            idx_bytes(
                IMAGES_MAGIC,
                &[n, 4, 5],
                &(0..n as u8 * 20).collect::<Vec<_>>(),
            )
        };
        std::fs::write(dir.join("train-images-idx3-ubyte"), img(3)).unwrap();
        std::fs::write(
            dir.join("train-labels-idx1-ubyte"),
            idx_bytes(LABELS_MAGIC, &[3], &[9, 0, 4]),
        )
        .unwrap();
        std::fs::write(dir.join("t10k-images-idx3-ubyte.gz"), gz(&img(2))).unwrap();
        let labels = gz(&idx_bytes(LABELS_MAGIC, &[2], &[1, 2]));
        std::fs::write(dir.join("t10k-labels-idx1-ubyte.gz"), labels).unwrap();
    }

    fn err(dir: &Path) -> String {
        load_idx_dir(dir, IdxKind::Mnist).unwrap_err().to_string()
    }

    #[test]
    fn reads_plain_and_gzipped() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path());
        let (train, test) = load_idx_dir(dir.path(), IdxKind::Mnist).unwrap();
        assert_eq!((train.n, train.c, train.h, train.w), (3, 1, 4, 5));
        assert_eq!(train.labels, vec![9, 0, 4]);
        assert_eq!(train.images, (0..60).collect::<Vec<u8>>());
        assert_eq!((test.n, test.labels.clone()), (2, vec![1, 2]));
        assert_eq!(test.images, (0..40).collect::<Vec<u8>>());
        assert_eq!((train.mean[0], train.std[0]), (0.1307, 0.3081));
        assert_eq!(train.class_names[3], "3");
        // A gzipped file without the .gz name is recognised by its magic bytes.
        std::fs::remove_file(dir.path().join("train-labels-idx1-ubyte")).unwrap();
        let three = gz(&idx_bytes(LABELS_MAGIC, &[3], &[1, 1, 1]));
        std::fs::write(dir.path().join("train-labels-idx1-ubyte"), three).unwrap();
        let (train, _) = load_idx_dir(dir.path(), IdxKind::FashionMnist).unwrap();
        assert_eq!(train.labels, vec![1, 1, 1]);
        assert_eq!(train.class_names[9], "Ankle boot");
        assert_eq!(train.mean[0], 0.2860);
    }

    #[test]
    fn truncated_file() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path());
        let p = dir.path().join("train-images-idx3-ubyte");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 7]).unwrap();
        let e = err(dir.path());
        assert!(
            e.contains("train-images-idx3-ubyte") && e.contains("truncated"),
            "{e}"
        );
        assert!(e.contains("expected 76 bytes, found 69"), "{e}");
        std::fs::write(&p, &bytes[..2]).unwrap();
        assert!(err(dir.path()).contains("truncated"));
        std::fs::write(&p, &bytes[..10]).unwrap();
        assert!(err(dir.path()).contains("expected 16 bytes, found 10"));
        // A cut gzip stream.
        let p = dir.path().join("t10k-images-idx3-ubyte.gz");
        let bytes = std::fs::read(&p).unwrap();
        write_set(dir.path());
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        let e = err(dir.path());
        assert!(
            e.contains("t10k-images-idx3-ubyte.gz") && e.contains("gzip"),
            "{e}"
        );
    }

    #[test]
    fn wrong_magic() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path());
        let labels = std::fs::read(dir.path().join("train-labels-idx1-ubyte")).unwrap();
        std::fs::write(dir.path().join("train-images-idx3-ubyte"), labels).unwrap();
        let e = err(dir.path());
        assert!(e.contains("train-images-idx3-ubyte"), "{e}");
        assert!(e.contains("expected 0x00000803, found 0x00000801"), "{e}");
    }

    #[test]
    fn count_mismatch_and_bad_label() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path());
        let p = dir.path().join("train-labels-idx1-ubyte");
        std::fs::write(&p, idx_bytes(LABELS_MAGIC, &[2], &[1, 2])).unwrap();
        let e = err(dir.path());
        assert!(e.contains("3 images") && e.contains("2 labels"), "{e}");
        std::fs::write(&p, idx_bytes(LABELS_MAGIC, &[3], &[1, 10, 2])).unwrap();
        let e = err(dir.path());
        assert!(
            e.contains("train-labels-idx1-ubyte") && e.contains("label 10"),
            "{e}"
        );
        std::fs::write(&p, idx_bytes(LABELS_MAGIC, &[3], &[1, 2, 3, 4])).unwrap();
        assert!(err(dir.path()).contains("1 unexpected bytes"));
    }

    #[test]
    fn gzip_is_inflated_no_further_than_the_header_promises() {
        // 10 images of 28×28 promised (7,856 bytes), then 64 MiB of zeros: a 64 KiB bomb.
        let path = Path::new("bomb-images-idx3-ubyte.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&idx_bytes(IMAGES_MAGIC, &[10, 28, 28], &[]))
            .unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            e.write_all(&zeros).unwrap();
        }
        let bomb = e.finish().unwrap();
        assert!(bomb.len() < 1 << 20, "{}", bomb.len());
        let err = maybe_gunzip(path, bomb, IMAGES_MAGIC, 3)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("inflates to more than the 7856 bytes its IDX header promises"),
            "{err}"
        );
        // Exactly the promise is read back; a wrong magic is named before the body is inflated.
        let exact = idx_bytes(IMAGES_MAGIC, &[2, 2, 2], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            maybe_gunzip(path, gz(&exact), IMAGES_MAGIC, 3).unwrap(),
            exact
        );
        let err = maybe_gunzip(path, gz(&exact), LABELS_MAGIC, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("wrong IDX magic"), "{err}");
    }

    #[test]
    fn absurd_dimensions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path());
        // 2^32 − 1 images of 65,535² pixels: 2^64 bytes would overflow; 1000 × 65,535² is above 4 GiB.
        for dims in [[u32::MAX, 65_535, 65_535], [1000, 65_535, 65_535]] {
            let header = idx_bytes(IMAGES_MAGIC, &dims, &[0; 64]);
            std::fs::write(dir.path().join("train-images-idx3-ubyte"), &header).unwrap();
            let e = err(dir.path());
            assert!(e.contains("too large (at most 4 GiB"), "{e}");
            std::fs::write(dir.path().join("train-images-idx3-ubyte"), gz(&header)).unwrap();
            let e = err(dir.path());
            assert!(e.contains("too large (at most 4 GiB"), "{e}");
        }
    }

    #[test]
    fn missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let e = err(&dir.path().join("absent"));
        assert!(
            e.contains("data folder not found") && e.contains("absent"),
            "{e}"
        );
        write_set(dir.path());
        std::fs::remove_file(dir.path().join("t10k-labels-idx1-ubyte.gz")).unwrap();
        let e = err(dir.path());
        assert!(
            e.contains("IDX label file not found") && e.contains("t10k-labels-idx1-ubyte"),
            "{e}"
        );
    }

    #[test]
    fn embedded_default() {
        let (train, test) = embedded_fashion_mnist().unwrap();
        assert_eq!((train.len(), test.len()), (8000, 2000));
        assert_eq!((train.c, train.h, train.w), (1, 28, 28));
        assert_eq!(train.images.len(), 8000 * 784);
        assert!(train.labels.iter().chain(&test.labels).all(|&l| l < 10));
        assert_eq!(train.class_names, test.class_names);
        assert_eq!(train.num_classes, 10);
    }

    #[test]
    fn real_fashion_mnist() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/fashion-mnist");
        assert!(
            dir.is_dir(),
            "the real Fashion-MNIST is missing: expected it at {} (../shared/data/fashion-mnist relative to the \
             repository root)",
            dir.display()
        );
        let (train, test) = load_idx_dir(&dir, IdxKind::FashionMnist).unwrap();
        assert_eq!((train.len(), test.len()), (60000, 10000));
        assert_eq!((train.h, train.w), (28, 28));
        assert_eq!(train.labels[..10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]);
        assert!(train.labels.iter().chain(&test.labels).all(|&l| l < 10));
    }
}
