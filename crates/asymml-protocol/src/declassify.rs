//! Declassification: the only way tensor data gets onto the wire.
//!
//! A private [`Tensor`] has no serialisation. Data leaves the trusted runtime only as a [`WireTensor`], and a
//! `WireTensor` is built from a `Tensor` only by the functions of this module, each named for what leaves:
//!
//! | function                   | what crosses the boundary                                   |
//! |----------------------------|-------------------------------------------------------------|
//! | [`declassify_residual`]    | the residual `X_U = X − X_T` of a convolution's input        |
//! | [`declassify_output_grad`] | `∇Y`, the gradient of a convolution's output                 |
//! | [`declassify_residual_into`], [`declassify_output_grad_into`] | the same two, written straight into their frame |
//! | [`declassify_updated_weights`] (`_owned`) | a conv's weights after the trusted optimizer step (they carry the update, so ∇W) |
//! | [`public_weights`]         | initial convolution weights and biases (public parameters)   |
//! | [`accelerator_result`]     | the accelerator's own results (`Y_U`, `∇X`, `∇W_U`, its weights) |
//!
//! `grep -rn declassify_` lists every leak of private data. [`accelerator_result`] is for the untrusted side,
//! whose data is already public; the trusted runtime must never call it (a test checks for that by grep).
//!
//! The receiving side turns a `WireTensor` back into a `Tensor` with [`WireTensor::into_tensor_checked`] (or
//! [`WireTensor::into_tensor_matching`]), which validate the shape, the length and the finiteness of the data.

use std::fmt;

use asymml_core::Tensor;

use crate::client::TensorFrame;
use crate::error::{ProtocolError, Result};
use crate::message::MessageKind;

/// Tensor data that may cross the trust boundary: a shape and row-major f32 values.
///
/// Its fields are private; see the module documentation for the only constructors.
#[derive(Clone)]
pub struct WireTensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

/// Declassifies the residual `X_U` of a convolution's input (sent with `ConvForward`).
pub fn declassify_residual(x_u: &Tensor) -> WireTensor {
    WireTensor::copy_of(x_u)
}

/// [`declassify_residual`] taking the buffer instead of copying it (the sender gets it back after sending with
/// [`WireTensor::reclaim_sent`]).
pub fn declassify_residual_owned(x_u: Tensor) -> WireTensor {
    WireTensor {
        shape: x_u.shape,
        data: x_u.data,
    }
}

/// [`declassify_residual`] of values `offset ..` of `X_U`, written straight into the `ConvForward` frame
/// that will carry it (from [`Client::start_conv_forward`](crate::Client::start_conv_forward)).
pub fn declassify_residual_into(frame: &mut TensorFrame, offset: usize, x_u: &[f32]) -> Result<()> {
    if frame.kind() != MessageKind::ConvForward {
        return Err(ProtocolError::Misuse(format!(
            "a residual written into a {} frame",
            frame.kind()
        )));
    }
    frame.put(offset, x_u)
}

/// [`declassify_output_grad`] written straight into the `ConvBackward` or `ConvInputGrad` frame that will carry
/// it (from [`Client::start_conv_backward`](crate::Client::start_conv_backward) or
/// [`Client::start_input_grad`](crate::Client::start_input_grad)), whose shape must be `dy`'s.
pub fn declassify_output_grad_into(frame: &mut TensorFrame, dy: &Tensor) -> Result<()> {
    let kind_fits = matches!(
        frame.kind(),
        MessageKind::ConvBackward | MessageKind::ConvInputGrad
    );
    if !kind_fits || frame.shape() != dy.shape.as_slice() {
        return Err(ProtocolError::Misuse(format!(
            "∇Y of shape {:?} written into a {} frame of shape {:?}",
            dy.shape,
            frame.kind(),
            frame.shape()
        )));
    }
    frame.put(0, &dy.data)
}

/// Declassifies `∇Y`, the gradient of a convolution's output (sent with `ConvBackward` or `ConvInputGrad`).
pub fn declassify_output_grad(dy: &Tensor) -> WireTensor {
    WireTensor::copy_of(dy)
}

/// Declassifies a convolution's weights (or bias) after the trusted runtime's optimizer step (sent with
/// `SetWeights`). The accelerator knew the previous weights, so it learns the update, and from it the merged
/// gradient ∇W = ∇W_T + ∇W_U: that is what leaves.
pub fn declassify_updated_weights(w: &Tensor) -> WireTensor {
    WireTensor::copy_of(w)
}

/// [`declassify_updated_weights`] taking the buffer instead of copying it (the sender gets it back after sending
/// with [`WireTensor::reclaim_sent`]).
pub fn declassify_updated_weights_owned(w: Tensor) -> WireTensor {
    WireTensor {
        shape: w.shape,
        data: w.data,
    }
}

/// `untrusted-only` mode (the no-privacy baseline): the raw network input leaves the trusted runtime.
pub fn declassify_input_untrusted_only(x: &Tensor) -> WireTensor {
    WireTensor::copy_of(x)
}

/// `untrusted-only` mode: the gradient of the loss w.r.t. the logits (labels and loss stay trusted).
pub fn declassify_logit_grad(dlogits: &Tensor) -> WireTensor {
    WireTensor::copy_of(dlogits)
}

/// Public model parameters: initial convolution weights or biases (sent with `Register`).
pub fn public_weights(w: &Tensor) -> WireTensor {
    WireTensor::copy_of(w)
}

/// A result of the untrusted accelerator (`Y_U`, `∇X`, its weights), computed from data already on the untrusted
/// side. For the accelerator's replies only: the trusted runtime never calls this.
pub fn accelerator_result(t: &Tensor) -> WireTensor {
    WireTensor::copy_of(t)
}

/// [`accelerator_result`] taking the buffer instead of copying it.
pub fn accelerator_result_owned(t: Tensor) -> WireTensor {
    WireTensor {
        shape: t.shape,
        data: t.data,
    }
}

impl WireTensor {
    /// The sender takes back the buffer of a tensor it sent (its own data, already encoded), to reuse it.
    /// Not for received tensors: those go through the checked conversions.
    pub fn reclaim_sent(self) -> Tensor {
        Tensor {
            shape: self.shape,
            data: self.data,
        }
    }

    fn copy_of(t: &Tensor) -> Self {
        WireTensor {
            shape: t.shape.clone(),
            data: t.data.clone(),
        }
    }

    /// Built by the decoder from validated parts (`data.len()` is the product of `shape`).
    pub(crate) fn from_decoded(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        WireTensor { shape, data }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The values, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the tensor holds no value.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Size of the encoded payload (values only) in bytes.
    pub fn payload_bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// The tensor, after checking that its shape is exactly `expected_shape`, that its length is the product of
    /// the shape and that every value is finite. The error says what was wrong.
    pub fn into_tensor_checked(self, expected_shape: &[usize]) -> Result<Tensor> {
        if self.shape != expected_shape {
            return Err(ProtocolError::Tensor(format!(
                "wrong shape: expected {expected_shape:?}, got {:?}",
                self.shape
            )));
        }
        self.into_tensor_finite()
    }

    /// The values, after the checks of [`into_tensor_checked`](Self::into_tensor_checked) (exact shape, length,
    /// every value finite), without taking them out of the message.
    pub fn checked_data(&self, expected_shape: &[usize]) -> Result<&[f32]> {
        if self.shape != expected_shape {
            return Err(ProtocolError::Tensor(format!(
                "wrong shape: expected {expected_shape:?}, got {:?}",
                self.shape
            )));
        }
        self.check_length_and_values()?;
        Ok(&self.data)
    }

    /// Like [`into_tensor_checked`](Self::into_tensor_checked) with a shape pattern: `None` accepts any size in
    /// that dimension (e.g. `[None, Some(64), None, None]` for an NCHW batch of 64 channels).
    pub fn into_tensor_matching(self, pattern: &[Option<usize>]) -> Result<Tensor> {
        let ok = self.shape.len() == pattern.len()
            && self
                .shape
                .iter()
                .zip(pattern)
                .all(|(&d, p)| p.is_none_or(|p| p == d));
        if !ok {
            let want: Vec<String> = pattern
                .iter()
                .map(|p| p.map_or_else(|| "_".to_string(), |d| d.to_string()))
                .collect();
            return Err(ProtocolError::Tensor(format!(
                "wrong shape: expected [{}], got {:?}",
                want.join(", "),
                self.shape
            )));
        }
        self.into_tensor_finite()
    }

    /// Copies the values into `out` (reusing its allocation) after the checks of
    /// [`into_tensor_checked`](Self::into_tensor_checked).
    pub fn copy_into_checked(&self, expected_shape: &[usize], out: &mut Tensor) -> Result<()> {
        if self.shape != expected_shape {
            return Err(ProtocolError::Tensor(format!(
                "wrong shape: expected {expected_shape:?}, got {:?}",
                self.shape
            )));
        }
        self.check_length_and_values()?;
        out.resize(&self.shape);
        out.data.copy_from_slice(&self.data);
        Ok(())
    }

    /// self + `addend`, added into the message's own values (no second buffer) in one pass, after the checks
    /// of [`into_tensor_checked`](Self::into_tensor_checked); `addend` must have the expected shape too.
    pub fn into_sum_checked(mut self, expected_shape: &[usize], addend: &Tensor) -> Result<Tensor> {
        if self.shape != expected_shape || addend.shape != expected_shape {
            return Err(ProtocolError::Tensor(format!(
                "wrong shape: expected {expected_shape:?}, got {:?} (adding to {:?})",
                self.shape, addend.shape
            )));
        }
        self.check_length()?;
        checked_sum::<f32, true>(&mut self.data, &addend.data, &self.shape)?;
        Ok(Tensor {
            shape: self.shape,
            data: self.data,
        })
    }

    /// The values, after checking the shape and the length but **not** that every value is finite: for a
    /// caller whose own pass over every value fails on a NaN or infinity (the trusted runtime's integrity
    /// check: such a value makes its sums non-finite) and then names the value with
    /// [`checked_data`](Self::checked_data). Spares one read of the tensor.
    pub fn shaped_data_unscanned(&self, expected_shape: &[usize]) -> Result<&[f32]> {
        if self.shape != expected_shape {
            return Err(ProtocolError::Tensor(format!(
                "wrong shape: expected {expected_shape:?}, got {:?}",
                self.shape
            )));
        }
        self.check_length()?;
        Ok(&self.data)
    }

    /// [`shaped_data_unscanned`](Self::shaped_data_unscanned) taking the values out of the message.
    pub fn into_tensor_unscanned(self, expected_shape: &[usize]) -> Result<Tensor> {
        self.shaped_data_unscanned(expected_shape)?;
        Ok(Tensor {
            shape: self.shape,
            data: self.data,
        })
    }

    fn into_tensor_finite(self) -> Result<Tensor> {
        self.check_length_and_values()?;
        Ok(Tensor {
            shape: self.shape,
            data: self.data,
        })
    }

    fn check_length_and_values(&self) -> Result<()> {
        self.check_length()?;
        self.check_values()
    }

    fn check_length(&self) -> Result<()> {
        let n = self
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                ProtocolError::Tensor(format!(
                    "shape {:?} overflows the element count",
                    self.shape
                ))
            })?;
        if n != self.data.len() {
            return Err(ProtocolError::Tensor(format!(
                "wrong length: shape {:?} needs {n} values, got {}",
                self.shape,
                self.data.len()
            )));
        }
        Ok(())
    }

    fn check_values(&self) -> Result<()> {
        if let Some(i) = first_non_finite(&self.data) {
            return Err(ProtocolError::Tensor(format!(
                "non-finite value {} at index {i} of a tensor of shape {:?}",
                self.data[i], self.shape
            )));
        }
        Ok(())
    }
}

/// A received value as it is held: an f32, or its little-endian bytes in a frame.
trait Word: Copy {
    fn value(self) -> f32;
}

impl Word for f32 {
    #[inline(always)]
    fn value(self) -> f32 {
        self
    }
}

impl Word for [u8; 4] {
    #[inline(always)]
    fn value(self) -> f32 {
        f32::from_le_bytes(self)
    }
}

/// `dst` += `src` elementwise (same lengths), refusing a non-finite value: with `RECEIVED_IN_DST` the received
/// values are `dst`'s (and `src` the trusted addend), else `src`'s. The values are checked in the pass that adds
/// them, branch-free so that it vectorises: `v · 0` is NaN exactly when v is not finite, and a lane's witness
/// keeps it. One witness for the received values, one for the sums (finite terms can still overflow); only a
/// failed block is looked at again, to name the value (a NaN or infinity stays one when a finite addend is
/// added to it).
fn checked_sum<W: Word, const RECEIVED_IN_DST: bool>(
    dst: &mut [f32],
    src: &[W],
    shape: &[usize],
) -> Result<()> {
    const BLOCK: usize = 4096;
    for (bi, (v, a)) in dst.chunks_mut(BLOCK).zip(src.chunks(BLOCK)).enumerate() {
        let mut got = [0f32; 8];
        let mut sum = [0f32; 8];
        let mut vs = v.chunks_exact_mut(8);
        let mut as_ = a.chunks_exact(8);
        for (o, a) in (&mut vs).zip(&mut as_) {
            for i in 0..8 {
                let add = a[i].value();
                got[i] += if RECEIVED_IN_DST { o[i] } else { add } * 0.0;
                o[i] += add;
                sum[i] += o[i] * 0.0;
            }
        }
        for (o, a) in vs.into_remainder().iter_mut().zip(as_.remainder()) {
            let add = a.value();
            got[0] += if RECEIVED_IN_DST { *o } else { add } * 0.0;
            *o += add;
            sum[0] += *o * 0.0;
        }
        if sum.iter().all(|w| *w == 0.0) {
            continue;
        }
        if got.iter().all(|w| *w == 0.0) {
            return Err(ProtocolError::Tensor(format!(
                "adding the tensor of shape {shape:?} to the trusted part gives values beyond float32's range"
            )));
        }
        let (i, bad) = if RECEIVED_IN_DST {
            let i = first_non_finite(v).unwrap_or(0);
            (i, v[i])
        } else {
            let i = a.iter().position(|w| !w.value().is_finite()).unwrap_or(0);
            (i, a[i].value())
        };
        return Err(ProtocolError::Tensor(format!(
            "non-finite value {bad} at index {} of a tensor of shape {shape:?}",
            bi * BLOCK + i
        )));
    }
    Ok(())
}

/// A tensor of a received reply, read where it lies in the frame (no copy): its shape and its values as
/// little-endian f32 words. Built only by the decoder ([`decode_conv_output_view`](crate::codec::decode_conv_output_view));
/// the receiver checks its shape and consumes the values in its own pass ([`add_into_checked`](Self::add_into_checked),
/// or the trusted runtime's integrity check).
pub struct ReceivedTensor<'a> {
    shape: Vec<usize>,
    words: &'a [[u8; 4]],
}

impl<'a> ReceivedTensor<'a> {
    /// Built by the decoder from validated parts (`words.len()` is the product of `shape`).
    pub(crate) fn from_frame(shape: Vec<usize>, words: &'a [[u8; 4]]) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), words.len());
        ReceivedTensor { shape, words }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The address of the first value (to find it again in the frame).
    pub(crate) fn address(&self) -> usize {
        self.words.as_ptr() as usize
    }

    /// The values' words after checking that the shape is exactly `expected_shape`, but **not** that every
    /// value is finite: for a caller whose own pass over every value fails on a NaN or infinity, and then
    /// names it with [`first_non_finite`](Self::first_non_finite).
    pub fn words_unscanned(&self, expected_shape: &[usize]) -> Result<&'a [[u8; 4]]> {
        if self.shape != expected_shape {
            return Err(ProtocolError::Tensor(format!(
                "wrong shape: expected {expected_shape:?}, got {:?}",
                self.shape
            )));
        }
        Ok(self.words)
    }

    /// `out` += the values, in one pass that also refuses a non-finite value (or sum), after checking that the
    /// shape is exactly `expected_shape`, and `out`'s too.
    pub fn add_into_checked(&self, expected_shape: &[usize], out: &mut Tensor) -> Result<()> {
        if out.shape != expected_shape {
            return Err(ProtocolError::Tensor(format!(
                "wrong shape: expected {expected_shape:?}, got {:?} (adding to {:?})",
                self.shape, out.shape
            )));
        }
        self.add_into_slice_checked(expected_shape, &mut out.data)
    }

    /// [`add_into_checked`](Self::add_into_checked) into a slice of exactly the values' length (e.g. some
    /// samples' rows of a larger tensor).
    pub fn add_into_slice_checked(&self, expected_shape: &[usize], out: &mut [f32]) -> Result<()> {
        if self.shape != expected_shape || out.len() != self.words.len() {
            return Err(ProtocolError::Tensor(format!(
                "wrong shape: expected {expected_shape:?}, got {:?} (adding to {} values)",
                self.shape,
                out.len()
            )));
        }
        checked_sum::<[u8; 4], false>(out, self.words, &self.shape)
    }

    /// Copies the values into `out` (resized to the shape, reusing its allocation) after checking that the
    /// shape is exactly `expected_shape`; with `scan`, also that every value is finite (without: for a caller
    /// whose own pass over the copy fails on a NaN or infinity). Each value is read once.
    pub fn copy_into(&self, expected_shape: &[usize], out: &mut Tensor, scan: bool) -> Result<()> {
        let words = self.words_unscanned(expected_shape)?;
        out.resize(expected_shape);
        out.data
            .iter_mut()
            .zip(words)
            .for_each(|(o, w)| *o = w.value());
        if scan {
            if let Some(i) = first_non_finite(&out.data) {
                return Err(ProtocolError::Tensor(format!(
                    "non-finite value {} at index {i} of a tensor of shape {:?}",
                    out.data[i], self.shape
                )));
            }
        }
        Ok(())
    }

    /// The index and value of the first NaN or infinity, if any.
    pub fn first_non_finite(&self) -> Option<(usize, f32)> {
        self.words
            .iter()
            .map(|w| w.value())
            .enumerate()
            .find(|(_, v)| !v.is_finite())
    }
}

/// Index of the first NaN or infinity, scanning in vectorisable blocks.
fn first_non_finite(data: &[f32]) -> Option<usize> {
    const BLOCK: usize = 1024;
    for (b, chunk) in data.chunks(BLOCK).enumerate() {
        // `v · 0` is NaN exactly when v is not finite; a lane's sum keeps it, and the loop has no branch, so
        // it vectorises. Only a failed block is searched.
        let mut w = [0f32; 8];
        let mut lanes = chunk.chunks_exact(8);
        for v in &mut lanes {
            for i in 0..8 {
                w[i] += v[i] * 0.0;
            }
        }
        for v in lanes.remainder() {
            w[0] += v * 0.0;
        }
        if w.iter().any(|w| *w != 0.0) {
            let i = chunk.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Some(b * BLOCK + i);
        }
    }
    None
}

impl PartialEq for WireTensor {
    /// Bitwise equality of the values (so a NaN equals itself: a round trip is exact).
    fn eq(&self, other: &Self) -> bool {
        self.shape == other.shape
            && self.data.len() == other.data.len()
            && self
                .data
                .iter()
                .zip(&other.data)
                .all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

impl fmt::Debug for WireTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOW: usize = 6;
        write!(f, "WireTensor {{ shape: {:?}, data: [", self.shape)?;
        for (i, v) in self.data.iter().take(SHOW).enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{v}")?;
        }
        if self.data.len() > SHOW {
            write!(f, ", … ({} values)", self.data.len())?;
        }
        write!(f, "] }}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_non_finite_finds_the_first_bad_value() {
        let mut v = vec![1.0f32; 5000];
        assert_eq!(first_non_finite(&v), None);
        v[3001] = f32::NEG_INFINITY;
        v[4000] = f32::NAN;
        assert_eq!(first_non_finite(&v), Some(3001));
        v[7] = f32::NAN;
        assert_eq!(first_non_finite(&v), Some(7));
        // Largest finite values and subnormals are finite.
        assert_eq!(first_non_finite(&[f32::MAX, f32::MIN, 1e-45, -0.0]), None);
    }
}
