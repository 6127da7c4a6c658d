//! Datasets: readers for IDX (MNIST, Fashion-MNIST), the CIFAR-10 binary format and ImageFolder trees, the
//! embedded Fashion-MNIST default, and batching with augmentation.
//!
//! Every reader validates its input and reports faults as [`DataError`]s that name the file or folder and the
//! fault; no input makes them panic. Images are held as `u8` NCHW in a [`Dataset`] and normalised to `f32` only
//! when a batch is filled ([`Dataset::fill_batch`]).

mod cifar;
mod dataset;
mod folder;
mod idx;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub(crate) use cifar::load_cifar10;
pub use dataset::Dataset;
pub(crate) use dataset::{epoch_order, normalize_into, Augment};
pub(crate) use folder::{image_dimensions, list_images, load_folder, load_image};
pub use idx::embedded_fashion_mnist;
pub(crate) use idx::{load_idx_dir, IdxKind};

/// Everything that can go wrong while reading a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{what} not found: {}", path.display())]
    Missing { path: PathBuf, what: &'static str },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: wrong IDX magic number: expected {expected:#010x}, found {found:#010x}", path.display())]
    BadMagic {
        path: PathBuf,
        expected: u32,
        found: u32,
    },
    #[error("{}: file is truncated: expected {expected} bytes, found {actual}", path.display())]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{}: {msg}", path.display())]
    BadFormat { path: PathBuf, msg: String },
    #[error(
        "image/label count mismatch: {} holds {images} images but {} holds {labels} labels",
        images_path.display(),
        labels_path.display()
    )]
    CountMismatch {
        images_path: PathBuf,
        labels_path: PathBuf,
        images: usize,
        labels: usize,
    },
    #[error("{}: record {index} has label {label}, but labels must be below {num_classes}", path.display())]
    BadLabel {
        path: PathBuf,
        index: usize,
        label: u32,
        num_classes: usize,
    },
    #[error("{}: {what}", path.display())]
    Empty { path: PathBuf, what: &'static str },
    #[error("cannot decode image {}: {msg}", path.display())]
    Image { path: PathBuf, msg: String },
    #[error(
        "class folders differ between {} {train:?} and {} {test:?}",
        train_dir.display(),
        test_dir.display()
    )]
    ClassMismatch {
        train_dir: PathBuf,
        test_dir: PathBuf,
        train: Vec<String>,
        test: Vec<String>,
    },
    #[error("unknown dataset '{0}' (expected one of: mnist, fashion-mnist, cifar10, folder)")]
    UnknownDataset(String),
    #[error("dataset '{0}' needs --data-dir (only fashion-mnist has an embedded default)")]
    NeedDataDir(DatasetKind),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error(
        "{n} images of {c}×{size}×{size} px need {:.1} GiB in memory, above the limit of {} GiB: use a smaller \
         --input-size",
        *bytes as f64 / (1u64 << 30) as f64,
        MAX_IMAGES_BYTES >> 30
    )]
    TooManyBytes {
        n: usize,
        c: usize,
        size: usize,
        bytes: u128,
    },
}

/// Most bytes of images a dataset holds in memory (`u8` pixels, after resizing to the input size).
pub(crate) const MAX_IMAGES_BYTES: u64 = 16 << 30;

/// Refuses `n` images of `c` planes of `size`×`size` bytes above [`MAX_IMAGES_BYTES`], before they are
/// decoded or resized.
pub(crate) fn check_images_bytes(n: usize, c: usize, size: usize) -> Result<()> {
    let bytes = [n, c, size, size]
        .iter()
        .try_fold(1u128, |acc, &k| acc.checked_mul(k as u128))
        .unwrap_or(u128::MAX);
    if bytes > u128::from(MAX_IMAGES_BYTES) {
        return Err(DataError::TooManyBytes { n, c, size, bytes });
    }
    Ok(())
}

pub type Result<T> = std::result::Result<T, DataError>;

/// The dataset formats the CLI knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetKind {
    Mnist,
    FashionMnist,
    Cifar10,
    Folder,
}

impl DatasetKind {
    const NAMES: [(DatasetKind, &'static str); 4] = [
        (DatasetKind::Mnist, "mnist"),
        (DatasetKind::FashionMnist, "fashion-mnist"),
        (DatasetKind::Cifar10, "cifar10"),
        (DatasetKind::Folder, "folder"),
    ];

    /// The name used on the command line.
    pub(crate) fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(k, _)| *k == self)
            .map_or("", |(_, n)| n)
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DatasetKind {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        Self::NAMES
            .iter()
            .find(|(_, n)| *n == lower)
            .map(|(k, _)| *k)
            .ok_or_else(|| DataError::UnknownDataset(s.to_string()))
    }
}

/// Loads `(train, test)` for `kind`. Fashion-MNIST without `data_dir` is the embedded default (8,000/2,000
/// images); every other kind needs `data_dir`. `channels_for_folder` (1 or 3), `size_for_folder` and `seed`
/// (for the held-out split of a folder without `train/`+`test/`) are used only by [`DatasetKind::Folder`].
pub(crate) fn load(
    kind: DatasetKind,
    data_dir: Option<&Path>,
    channels_for_folder: usize,
    size_for_folder: usize,
    seed: u64,
) -> Result<(Dataset, Dataset)> {
    let Some(dir) = data_dir else {
        return match kind {
            DatasetKind::FashionMnist => embedded_fashion_mnist(),
            _ => Err(DataError::NeedDataDir(kind)),
        };
    };
    match kind {
        DatasetKind::Mnist => load_idx_dir(dir, IdxKind::Mnist),
        DatasetKind::FashionMnist => load_idx_dir(dir, IdxKind::FashionMnist),
        DatasetKind::Cifar10 => load_cifar10(dir),
        DatasetKind::Folder => load_folder(dir, channels_for_folder, size_for_folder, seed),
    }
}

// ---- helpers shared by the readers ----

fn io_error(path: &Path, what: &'static str, source: std::io::Error) -> DataError {
    if source.kind() == std::io::ErrorKind::NotFound {
        DataError::Missing {
            path: path.to_path_buf(),
            what,
        }
    } else {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Reads a whole file; a missing file is reported as `what` not found.
fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| io_error(path, what, e))
}

/// Fails with `Missing` unless `path` is an existing directory.
fn require_dir(path: &Path, what: &'static str) -> Result<()> {
    if path.is_dir() {
        Ok(())
    } else {
        Err(DataError::Missing {
            path: path.to_path_buf(),
            what,
        })
    }
}

/// Checks that every label is below `num_classes`.
fn check_labels(path: &Path, labels: &[u32], num_classes: usize) -> Result<()> {
    match labels.iter().position(|&l| l as usize >= num_classes) {
        Some(index) => Err(DataError::BadLabel {
            path: path.to_path_buf(),
            index,
            label: labels[index],
            num_classes,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip() {
        for (k, n) in DatasetKind::NAMES {
            assert_eq!(k.to_string(), n);
            assert_eq!(n.parse::<DatasetKind>().unwrap(), k);
        }
        assert_eq!(
            "Fashion-MNIST".parse::<DatasetKind>().unwrap(),
            DatasetKind::FashionMnist
        );
        let e = "imagenet".parse::<DatasetKind>().unwrap_err();
        assert!(e.to_string().contains("unknown dataset 'imagenet'"), "{e}");
    }

    #[test]
    fn images_in_memory_are_bounded() {
        assert!(check_images_bytes(60_000, 1, 224).is_ok());
        let e = check_images_bytes(8000, 1, 4096).unwrap_err().to_string();
        assert!(
            e.contains("8000 images of 1×4096×4096 px need 125.0 GiB") && e.contains("16 GiB"),
            "{e}"
        );
        assert!(check_images_bytes(usize::MAX, usize::MAX, usize::MAX).is_err());
    }

    #[test]
    fn load_without_dir() {
        for kind in [
            DatasetKind::Mnist,
            DatasetKind::Cifar10,
            DatasetKind::Folder,
        ] {
            let e = load(kind, None, 3, 32, 0).unwrap_err();
            assert!(e.to_string().contains("--data-dir"), "{e}");
            assert!(e.to_string().contains(kind.name()), "{e}");
        }
        let (train, test) = load(DatasetKind::FashionMnist, None, 3, 32, 0).unwrap();
        assert_eq!((train.len(), test.len()), (8000, 2000));
    }

    #[test]
    fn missing_dir_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("nope");
        for kind in [
            DatasetKind::Mnist,
            DatasetKind::FashionMnist,
            DatasetKind::Cifar10,
            DatasetKind::Folder,
        ] {
            let e = load(kind, Some(&gone), 3, 32, 0).unwrap_err();
            assert!(matches!(e, DataError::Missing { .. }), "{kind}: {e}");
            assert!(e.to_string().contains("nope"), "{e}");
        }
    }
}
