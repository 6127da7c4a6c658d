//! Batches: a dataset fitted to a model, a reusable batch buffer, and the evaluation loop.

use crate::data::{Augment, Dataset};
use anyhow::{bail, Result};
use asymml_core::models::ModelSpec;
use asymml_core::rng::Rng;
use asymml_core::Tensor;
use asymml_trusted::Session;
use indicatif::ProgressBar;

/// Makes the dataset's images the model's input size (resizing when they differ).
pub(crate) fn fit_to(data: Dataset, size: usize) -> Dataset {
    if data.h == size && data.w == size {
        data
    } else {
        data.resize_to(size)
    }
}

/// Checks that a dataset fits a model (channels, classes).
pub(crate) fn check_fit(spec: &ModelSpec, data: &Dataset, what: &str) -> Result<()> {
    if data.c != spec.in_ch {
        bail!(
            "the {what} images have {} channel(s) but model {} takes {}",
            data.c,
            spec.name(),
            spec.in_ch
        );
    }
    if data.num_classes > spec.classes {
        bail!(
            "the {what} data has {} classes but model {} has {} outputs",
            data.num_classes,
            spec.name(),
            spec.classes
        );
    }
    Ok(())
}

/// A reusable batch buffer.
#[derive(Default)]
pub(crate) struct Batch {
    pub(crate) x: Tensor,
    pub(crate) labels: Vec<usize>,
}

impl Batch {
    pub(crate) fn new() -> Self {
        Batch::default()
    }

    /// Fills the buffer with the images at `idx`.
    pub(crate) fn fill(
        &mut self,
        data: &Dataset,
        idx: &[usize],
        aug: Option<&Augment>,
        rng: &mut Rng,
    ) {
        self.x.resize(&[idx.len(), data.c, data.h, data.w]);
        data.fill_batch(idx, aug, rng, &mut self.x.data, &mut self.labels);
    }
}

/// Mean loss and accuracy of `session` on `data` in evaluation mode.
pub(crate) fn evaluate(
    session: &mut Session,
    data: &Dataset,
    batch_size: usize,
    pb: &ProgressBar,
) -> Result<(f64, f64)> {
    let mut batch = Batch::new();
    let mut rng = Rng::new(0);
    let (mut loss_sum, mut correct) = (0.0f64, 0usize);
    let order: Vec<usize> = (0..data.len()).collect();
    for idx in order.chunks(batch_size.max(1)) {
        batch.fill(data, idx, None, &mut rng);
        let (loss, c) = session.eval_batch(&batch.x, &batch.labels)?;
        loss_sum += loss as f64 * idx.len() as f64;
        correct += c;
        pb.inc(idx.len() as u64);
    }
    let n = data.len().max(1) as f64;
    Ok((loss_sum / n, correct as f64 / n))
}
