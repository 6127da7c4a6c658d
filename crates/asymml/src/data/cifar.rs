//! The CIFAR-10 binary format: records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32×32).

use std::path::{Path, PathBuf};

use super::{check_labels, read_file, require_dir, DataError, Dataset, Result};

const SIDE: usize = 32;
const RECORD: usize = 1 + 3 * SIDE * SIDE;
const CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Loads `(train, test)` from `data_batch_1.bin` … `data_batch_5.bin` (those that exist, at least one) and
/// `test_batch.bin`, in `dir` or in its `cifar-10-batches-bin/` sub-folder.
pub(crate) fn load_cifar10(dir: &Path) -> Result<(Dataset, Dataset)> {
    require_dir(dir, "CIFAR-10 folder")?;
    let sub = dir.join("cifar-10-batches-bin");
    let dir = if sub.is_dir() { sub } else { dir.to_path_buf() };
    let train: Vec<PathBuf> = (1..=5)
        .map(|i| dir.join(format!("data_batch_{i}.bin")))
        .filter(|p| p.is_file())
        .collect();
    if train.is_empty() {
        return Err(DataError::Missing {
            path: dir.join("data_batch_1.bin"),
            what: "CIFAR-10 training batch (data_batch_1.bin … data_batch_5.bin)",
        });
    }
    Ok((
        read_batches(&train)?,
        read_batches(&[dir.join("test_batch.bin")])?,
    ))
}

fn read_batches(files: &[PathBuf]) -> Result<Dataset> {
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for path in files {
        let bytes = read_file(path, "CIFAR-10 batch file")?;
        if bytes.is_empty() {
            return Err(DataError::Empty {
                path: path.clone(),
                what: "CIFAR-10 batch file is empty",
            });
        }
        if bytes.len() % RECORD != 0 {
            return Err(DataError::Truncated {
                path: path.clone(),
                expected: bytes.len().div_ceil(RECORD) as u64 * RECORD as u64,
                actual: bytes.len() as u64,
            });
        }
        let start = labels.len();
        images.reserve(bytes.len() / RECORD * (RECORD - 1));
        for record in bytes.chunks_exact(RECORD) {
            labels.push(record[0] as u32);
            images.extend_from_slice(&record[1..]);
        }
        check_labels(path, &labels[start..], CLASSES.len())?;
    }
    Ok(Dataset {
        images,
        n: labels.len(),
        c: 3,
        h: SIDE,
        w: SIDE,
        labels,
        num_classes: CLASSES.len(),
        class_names: CLASSES.iter().map(|s| s.to_string()).collect(),
        mean: vec![0.4914, 0.4822, 0.4465],
        std: vec![0.2470, 0.2435, 0.2616],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `labels.len()` records; pixel bytes of record `r` are `(r + i) % 256`.
    fn records(labels: &[u8]) -> Vec<u8> {
        labels
            .iter()
            .enumerate()
            .flat_map(|(r, &l)| {
                std::iter::once(l).chain((0..RECORD - 1).map(move |i| ((r + i) % 256) as u8))
            })
            .collect()
    }

    fn err(dir: &Path) -> String {
        load_cifar10(dir).unwrap_err().to_string()
    }

    #[test]
    fn reads_batches_in_dir_and_subfolder() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cifar-10-batches-bin");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("data_batch_1.bin"), records(&[3, 9])).unwrap();
        std::fs::write(dir.join("data_batch_3.bin"), records(&[0])).unwrap();
        std::fs::write(dir.join("test_batch.bin"), records(&[7, 1, 2])).unwrap();
        for d in [root.path(), dir.as_path()] {
            let (train, test) = load_cifar10(d).unwrap();
            assert_eq!((train.n, train.c, train.h, train.w), (3, 3, 32, 32));
            assert_eq!(train.labels, vec![3, 9, 0]);
            assert_eq!(test.labels, vec![7, 1, 2]);
            assert_eq!(train.image(1)[..3], [1, 2, 3]);
            assert_eq!(train.image(2)[..2], [0, 1]);
            assert_eq!(test.image(2)[3071], ((2 + 3071) % 256) as u8);
            assert_eq!(train.class_names[1], "automobile");
            assert_eq!(train.mean.len(), 3);
        }
    }

    #[test]
    fn errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(err(&d.join("gone")).contains("CIFAR-10 folder not found"));
        assert!(err(d).contains("data_batch_1.bin"));
        std::fs::write(d.join("data_batch_2.bin"), records(&[1, 2])).unwrap();
        let e = err(d);
        assert!(
            e.contains("not found") && e.contains("test_batch.bin"),
            "{e}"
        );
        let mut cut = records(&[1]);
        cut.pop();
        std::fs::write(d.join("test_batch.bin"), &cut).unwrap();
        let e = err(d);
        assert!(
            e.contains("test_batch.bin") && e.contains("expected 3073 bytes, found 3072"),
            "{e}"
        );
        std::fs::write(d.join("test_batch.bin"), records(&[1, 4, 10])).unwrap();
        let e = err(d);
        assert!(
            e.contains("test_batch.bin") && e.contains("record 2 has label 10"),
            "{e}"
        );
        std::fs::write(d.join("test_batch.bin"), []).unwrap();
        assert!(err(d).contains("empty"));
    }
}
