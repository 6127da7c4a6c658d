//! asymml-trusted: the trusted runtime. It owns the dataset, the labels, every activation, the low-rank factors,
//! the nonlinearities and the loss, and drives training and inference.
//!
//! In `trusted-only` mode the whole network runs on the CPU layers of `asymml-core`; the split runtime that sends
//! residuals to the accelerator lands here next.
