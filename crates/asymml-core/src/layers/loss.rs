//! Softmax cross-entropy, mean over the batch.

use crate::error::{CoreError, Result};
use crate::tensor::Tensor;

/// Softmax followed by the negative log-likelihood of the labels, averaged over the batch.
#[derive(Default)]
pub struct SoftmaxCrossEntropy {
    /// Softmax probabilities of the last forward, [B, K].
    pub probs: Tensor,
    labels: Vec<usize>,
}

impl SoftmaxCrossEntropy {
    /// logits: [B, K], labels: B values in 0..K → mean loss. Keeps the probabilities for backward.
    pub fn forward(&mut self, logits: &Tensor, labels: &[usize]) -> Result<f32> {
        let (b, k) = match logits.shape.as_slice() {
            &[b, k] => (b, k),
            s => {
                return Err(CoreError::Shape(format!(
                    "cross-entropy: logits must be [B, K], got {s:?}"
                )))
            }
        };
        if labels.len() != b {
            return Err(CoreError::Shape(format!(
                "cross-entropy: {b} logit rows but {} labels",
                labels.len()
            )));
        }
        if let Some(&bad) = labels.iter().find(|&&l| l >= k) {
            return Err(CoreError::Invalid(format!(
                "cross-entropy: label {bad} out of range for {k} classes"
            )));
        }
        self.probs.resize(&[b, k]);
        self.labels.clear();
        self.labels.extend_from_slice(labels);
        let mut loss = 0.0f64;
        for ((row, prow), &l) in logits
            .data
            .chunks(k)
            .zip(self.probs.data.chunks_mut(k))
            .zip(labels)
        {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f64;
            for (p, &v) in prow.iter_mut().zip(row) {
                let e = ((v - max) as f64).exp();
                *p = e as f32;
                sum += e;
            }
            prow.iter_mut().for_each(|p| *p = (*p as f64 / sum) as f32);
            loss += sum.ln() - (row[l] - max) as f64;
        }
        Ok((loss / b.max(1) as f64) as f32)
    }

    /// → dlogits: [B, K] = (softmax − onehot(label)) / B.
    pub fn backward(&self, dlogits: &mut Tensor) {
        let (b, k) = (self.probs.shape[0], self.probs.shape[1]);
        dlogits.copy_from(&self.probs);
        let inv = 1.0 / b.max(1) as f32;
        for (row, &l) in dlogits.data.chunks_mut(k).zip(&self.labels) {
            row[l] -= 1.0;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }

    /// Number of rows whose arg-max equals the label (of the last forward).
    pub fn correct(&self) -> usize {
        let k = self.probs.shape.get(1).copied().unwrap_or(1);
        self.probs
            .data
            .chunks(k)
            .zip(&self.labels)
            .filter(|(row, &l)| argmax(row) == l)
            .count()
    }
}

/// Index of the largest value (first on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}
