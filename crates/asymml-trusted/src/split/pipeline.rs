//! Micro-batch pipelining of a split conv's forward (`SplitConfig::micro_batches`): the batch is cut into
//! parts of consecutive samples, and while the accelerator convolves part k's X_U the trusted runtime
//! decomposes part k + 1 and computes part k's Conv_T. Each part is its own `ConvForwardPart` and its own
//! integrity check; the accelerator assembles the whole batch's X_U for the backward (and for a shortcut conv
//! reading the same input), so the backward is the whole batch's as before, its ∇W_T summed over the parts.
//!
//! How many parts may be outstanding depends on the transport: over one that queues frames (in-process, or the
//! trusted runtime's end of a socket with its own writer and reader threads: `QueuedTransport`, what
//! `connect_with` gives) every part is sent as soon as it is decomposed; over a plain byte stream one at a time (the next part's decomposition
//! still overlaps the accelerator's work), since both sides writing more than the socket buffers hold while
//! neither reads would wait for good.
//!
//! An inference forward over a transport that queues frames goes further: the parts are streamed through the
//! network (`Net::forward`, [`SplitExec::stream_ranges`]). Each part goes through BatchNorm, ReLU and pooling
//! on its own, and its next conv is begun ([`SplitExec::begin_part`]: decomposed, X_U sent as a plain
//! `ConvForward` of the part's samples, Y_T computed) while the accelerator still works on the other parts of
//! the conv before; its reply is taken, checked and merged one stage later ([`SplitExec::finish_part`]). So
//! the accelerator does not wait at each conv's start for the first part's decomposition and the whole batch's
//! BatchNorm, nor the trusted runtime at its end for the last part. Nothing is kept for a backward (an
//! inference forward has none), and each part keeps its own residual (for its check) in its buffers.

use super::{bad_reply, Basis, SplitExec};
use asymml_core::decomp::{
    add_noise_samples, block_svd_flops, decompose_samples_with, light_svd_flops, BatchLowRank,
    RankPolicy, SvdMethod, TrustedConv,
};
use asymml_core::layers::Conv2d;
use asymml_core::models::StreamPart;
use asymml_core::{CoreError, Tensor};
use asymml_protocol::{
    declassify_residual_owned, ConvOutputFrame, ProtocolError, ReceivedTensor, Request, Transport,
};
use std::ops::Range;
use std::time::Instant;

/// One part of a micro-batched forward, kept by its conv for the backward: its samples and their
/// factorisation.
#[derive(Debug, Default)]
pub(super) struct Part {
    pub(super) samples: Range<usize>,
    pub(super) lr: BatchLowRank,
}

/// The buffers of one part, shared by every conv (a conv's forward uses them; a shortcut conv right after
/// reads its block input's residuals from them): the residual X_U as sent, and Y_T.
#[derive(Debug, Default)]
pub(super) struct PartBufs {
    res: Tensor,
    y_t: Tensor,
}

/// `b` samples cut into `parts` ranges of consecutive samples (each at least one), the first and the last
/// about half the size of the others: at a conv's start the accelerator waits for the first part's
/// decomposition, and at its end the trusted runtime for the last part's result, while in between each side
/// works on one part as the other works on the next.
pub(super) fn part_ranges(b: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, b.max(1));
    // Weights ½, 1, …, 1, ½ (two parts: ½, ½), summing to parts − 1 (to 1 for one part).
    let total = (parts.max(2) - 1) as f64;
    let weight = |k: usize| {
        if parts > 1 && (k == 0 || k + 1 == parts) {
            0.5
        } else {
            1.0
        }
    };
    let mut out = Vec::with_capacity(parts);
    let (mut start, mut cum) = (0usize, 0.0f64);
    for k in 0..parts {
        cum += weight(k);
        // Round the cumulative boundary; leave at least one sample to this part and to each one after it.
        let ideal = (b as f64 * cum / total).round() as usize;
        let end = if k + 1 == parts {
            b
        } else {
            ideal.clamp(start + 1, b - (parts - 1 - k))
        };
        out.push(start..end);
        start = end;
    }
    out
}

/// `what` failed: names `found`, a NaN or infinity of `in_what` (of `shape`), when there is one.
pub(super) fn name_found(
    what: &str,
    found: Option<f32>,
    shape: &[usize],
    in_what: &str,
    e: CoreError,
) -> CoreError {
    match found {
        Some(v) => bad_reply(
            what,
            ProtocolError::Tensor(format!(
                "non-finite value {v} in {in_what} of shape {shape:?}"
            )),
        ),
        None => e,
    }
}

impl<T: Transport> SplitExec<T> {
    /// The number of parts conv `id`'s forward of a batch of `b` samples is cut into (1: not micro-batched).
    pub(super) fn parts_for(&self, b: usize) -> usize {
        if self.cfg.basis == Basis::Shared {
            // One basis for the whole batch: its decomposition cannot start before the last sample.
            return 1;
        }
        self.cfg.micro_batches.clamp(1, b.max(1))
    }

    /// The parts a streamed inference forward of a batch of `b` is cut into (see `Net::forward` and the module
    /// documentation): the micro-batches, where the basis is per sample and the transport queues frames (the
    /// requests of every part and conv may be outstanding at once); none otherwise.
    pub(super) fn stream_ranges(&self, b: usize) -> Vec<Range<usize>> {
        let parts = self.parts_for(b);
        if parts < 2 || !self.client.transport().queues_frames() {
            return Vec::new();
        }
        part_ranges(b, parts)
    }

    /// An error when some part of a streamed forward still waits for its reply (a forward failed midway): the
    /// replies on their way would be taken for those of later requests.
    pub(super) fn none_in_flight(&self) -> Result<(), CoreError> {
        match self.in_flight.iter().position(Option::is_some) {
            None => Ok(()),
            Some(p) => Err(CoreError::accelerator(format!(
                "part {p} of an earlier streamed forward still waits for its reply (that forward failed); this \
                 accelerator session cannot go on"
            ))),
        }
    }

    /// Begins conv `conv.id`'s forward of one part of a streamed inference forward: the route, the part's
    /// decomposition, its X_U sent and its Y_T computed into `y` (its residual kept in the part's buffers for
    /// the check) — or the whole conv of the part here.
    pub(super) fn begin_part(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        part: &StreamPart,
    ) -> Result<(), CoreError> {
        let (id, p) = (conv.id, part.index);
        if (id == 0 && p == 0) || self.in_flight.get(p).copied().flatten().is_some() {
            // A new forward, or this part's last conv not finished: some reply is still on its way.
            self.none_in_flight()?;
            self.backward_ended()?;
        }
        if id >= self.layers.len() {
            return Err(CoreError::accelerator(format!(
                "conv {id} was not registered"
            )));
        }
        if id == 0 && p == 0 {
            self.step_start(x, false);
            self.count(|s| s.streamed_forwards += 1);
        }
        if self.in_flight.len() <= p {
            self.in_flight.resize(p + 1, None);
        }
        let sent = self.with_part_residual(p, |s| s.split_send(conv, x, y, false, true));
        if sent.map_err(|e| e.at_conv(&self.layers[id].name))? {
            self.in_flight[p] = Some(id);
        }
        Ok(())
    }

    /// Finishes what [`Self::begin_part`] began for `part`: its Y_U received, checked against the part's
    /// residual and added to Y_T in `y` (nothing to do where the conv ran here).
    pub(super) fn finish_part(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        part: &StreamPart,
    ) -> Result<(), CoreError> {
        let (id, p) = (conv.id, part.index);
        match self.in_flight.get(p).copied().flatten() {
            None => Ok(()),
            Some(c) if c == id => {
                self.in_flight[p] = None;
                self.with_part_residual(p, |s| {
                    s.receive_split(conv, x, y, false, None, None).map(drop)
                })
                .map_err(|e| e.at_conv(&self.layers[id].name))
            }
            Some(c) => Err(CoreError::Invalid(format!(
                "streamed forward: conv {id} of part {p} finished while conv {c}'s reply is due"
            ))),
        }
    }

    /// Runs `f` with part `p`'s residual buffer as the split's residual (the whole-batch path's decomposition,
    /// send and check then work on that part's X_U, which stays in the part's buffers between them).
    fn with_part_residual<R>(&mut self, p: usize, f: impl FnOnce(&mut Self) -> R) -> R {
        if self.part_bufs.len() <= p {
            self.part_bufs.resize_with(p + 1, PartBufs::default);
        }
        std::mem::swap(&mut self.residual, &mut self.part_bufs[p].res);
        let r = f(self);
        // (The part buffers are only let go at a new step's first conv, never inside `f`.)
        if let Some(b) = self.part_bufs.get_mut(p) {
            std::mem::swap(&mut self.residual, &mut b.res);
        }
        r
    }

    /// The split forward of conv `conv.id` in parts (see the module documentation).
    pub(super) fn forward_parts(
        &mut self,
        conv: &Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        train: bool,
        policy: RankPolicy,
        method: SvdMethod,
    ) -> Result<(), CoreError> {
        let id = conv.id;
        let b = x.shape[0];
        let out_shape = conv.out_shape(&x.shape)?;
        let mut parts = std::mem::take(&mut self.layers[id].parts);
        let ranges = part_ranges(b, self.parts_for(b));
        parts.resize_with(ranges.len(), Part::default);
        for (p, r) in parts.iter_mut().zip(ranges) {
            p.samples = r;
        }
        let mut proj = std::mem::take(&mut self.layers[id].proj);
        let mut bufs = std::mem::take(&mut self.part_bufs);
        bufs.resize_with(bufs.len().max(parts.len()), PartBufs::default);
        y.resize(&out_shape);
        let how = (train, policy, method);
        let res = self.run_parts(conv, x, y, how, &mut parts, &mut bufs, &mut proj);
        self.part_bufs = bufs;
        self.layers[id].parts = parts;
        self.layers[id].proj = proj;
        self.layers[id].shared_from = None;
        self.layers[id].trusted_route = false;
        self.last_decomposed = Some(id);
        res?;
        self.count_split_forward(conv, &x.shape);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn run_parts(
        &mut self,
        conv: &Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        (train, policy, method): (bool, RankPolicy, SvdMethod),
        parts: &mut [Part],
        bufs: &mut [PartBufs],
        proj: &mut crate::integrity::Projection,
    ) -> Result<(), CoreError> {
        let id = conv.id;
        let n = parts.len();
        let window = if self.client.transport().queues_frames() {
            n
        } else {
            1
        };
        let (mut decomposed, mut sent) = (0, 0);
        let mut rank = 0;
        let how = (policy, method);
        // Sends the parts the window allows, decomposing each first where that is not done yet.
        macro_rules! fill {
            ($k:expr) => {
                while sent < n && sent - $k < window {
                    if decomposed == sent {
                        let pb = (&mut parts[sent], &mut bufs[sent]);
                        rank = rank.max(self.decompose_part(x, id, pb, how)?);
                        decomposed += 1;
                    }
                    let (p, b) = (&parts[sent], &mut bufs[sent]);
                    self.send_part(id, x.shape[0], train, &p.samples, &mut b.res, conv)?;
                    sent += 1;
                }
            };
        }
        for k in 0..n {
            fill!(k);
            if decomposed < n {
                // The next part's decomposition overlaps the accelerator's work on the parts sent.
                let pb = (&mut parts[decomposed], &mut bufs[decomposed]);
                rank = rank.max(self.decompose_part(x, id, pb, how)?);
                decomposed += 1;
            }
            self.layers[id].rank = rank;
            let t0 = Instant::now();
            let p = &parts[k];
            let f = TrustedConv::forward_flops(conv, &p.lr)?;
            self.tconv.forward(conv, &p.lr, &mut bufs[k].y_t)?;
            self.trusted(id, t0, f);
            let what = format!(
                "ConvForwardPart(layer {id}, samples {}..{})",
                p.samples.start, p.samples.end
            );
            let frame = self.recv_conv_output(id)?;
            // The accelerator can start on the next part while this one is merged.
            fill!(k + 1);
            let samples = parts[k].samples.clone();
            let per_sample = y.len() / x.shape[0];
            let rows = &mut y.data[samples.start * per_sample..samples.end * per_sample];
            let p = train.then_some(&mut *proj);
            let whole = (samples.start, x.shape[0]);
            let merged = self.merge_part(conv, &bufs[k], &frame.y_u(), &what, p, whole, rows);
            self.client.reuse_frame(frame);
            merged?;
        }
        Ok(())
    }

    /// Decomposes `part`'s samples of x into its factorisation and its residual buffer (and adds the noise or
    /// clipping the config asks for); returns the rank.
    fn decompose_part(
        &mut self,
        x: &Tensor,
        id: usize,
        (part, bufs): (&mut Part, &mut PartBufs),
        (policy, method): (RankPolicy, SvdMethod),
    ) -> Result<usize, CoreError> {
        let res = &mut bufs.res;
        let t0 = Instant::now();
        let step = self.layers[id].step;
        let samples = part.samples.clone();
        let r =
            decompose_samples_with(x, samples.clone(), policy, step, method, &mut part.lr, res)?;
        match self.cfg.clip {
            Some(c) => {
                asymml_core::dp::clip_and_noise_batch(res, c, self.cfg.nsr, &mut self.rng)?;
            }
            None if self.cfg.nsr > 0.0 => {
                let per = x.len() / x.shape[0];
                let xs = &x.data[samples.start * per..samples.end * per];
                add_noise_samples(xs, res, self.cfg.nsr, &mut self.rng)?;
            }
            None => {}
        }
        let (pb, n, h, w) = res.nchw("split")?;
        let flops = match method {
            SvdMethod::Light { iters } => light_svd_flops(pb, n, h * w, r, iters),
            SvdMethod::Block(m) => block_svd_flops(pb, n, h * w, r, &m),
        };
        let dt = t0.elapsed().as_secs_f64();
        self.count_layer(Some(id), |l| l.decompose_s += dt);
        self.trusted(id, t0, flops);
        Ok(r)
    }

    /// Sends the X_U of `samples` (the buffer comes back for the check and the next step).
    fn send_part(
        &mut self,
        id: usize,
        batch: usize,
        train: bool,
        samples: &Range<usize>,
        res: &mut Tensor,
        conv: &Conv2d,
    ) -> Result<(), CoreError> {
        let too_big = |v: usize| {
            u32::try_from(v).map_err(|_| CoreError::Invalid(format!("a batch of {v} samples")))
        };
        let out = conv.out_shape(&res.shape)?;
        let y_u_bytes = 4 * out.iter().product::<usize>() as u64;
        let req = Request::ConvForwardPart {
            layer: id as u32,
            first: too_big(samples.start)?,
            batch: too_big(batch)?,
            x_u: declassify_residual_owned(std::mem::take(res)),
            train,
        };
        let sent = self.send(&req, Some(y_u_bytes));
        if let Request::ConvForwardPart { x_u, .. } = req {
            *res = x_u.reclaim_sent();
        }
        sent
    }

    /// Y = Y_T + Y_U of one part (samples `first ..` of a batch of `batch`) into `rows`, those samples' rows of
    /// the conv's output: Y_T (in `bufs`) is copied there, and Y_U, read where it lies in its reply frame, is
    /// added in the pass that checks it against the residual it was computed on (also in `bufs`) — with checks
    /// on; else in a pass that refuses non-finite values. `rows` are not to be used when this fails.
    #[allow(clippy::too_many_arguments)]
    fn merge_part(
        &mut self,
        conv: &Conv2d,
        bufs: &PartBufs,
        y_u: &ReceivedTensor<'_>,
        what: &str,
        proj: Option<&mut crate::integrity::Projection>,
        (first, batch): (usize, usize),
        rows: &mut [f32],
    ) -> Result<(), CoreError> {
        let id = conv.id;
        let (res, y_t) = (&bufs.res, &bufs.y_t);
        if rows.len() != y_t.len() {
            return Err(CoreError::Shape(format!(
                "{what}: {} output values for a Y_T of shape {:?}",
                rows.len(),
                y_t.shape
            )));
        }
        let t0 = Instant::now();
        rows.copy_from_slice(&y_t.data);
        if self.checker.is_none() {
            let r = y_u
                .add_into_slice_checked(&y_t.shape, rows)
                .map_err(|e| bad_reply(what, e));
            self.count_merge(id, t0);
            return r;
        }
        self.trusted(id, t0, 0.0);
        let words = y_u
            .words_unscanned(&y_t.shape)
            .map_err(|e| bad_reply(what, e))?;
        // The check's pass over Y_U also catches a NaN or infinity (see `forward_split`).
        self.checked(id, |ch| {
            let part = (first, batch);
            ch.check_forward_part_into(conv, &res.data, &res.shape, words, proj, rows, part)
        })
        .map_err(|e| {
            let found = y_u.first_non_finite().map(|(_, v)| v);
            name_found(what, found, &y_t.shape, "Y_U", e)
        })
    }

    /// The forward of a shortcut conv reading the input of conv `from`, whose forward ran in parts (just
    /// before: the part buffers still hold its residuals): Y_T and the checks part by part, Y_U (the
    /// accelerator's, on the whole batch's X_U it assembled) in one reply.
    pub(super) fn forward_shared_parts(
        &mut self,
        conv: &Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        train: bool,
        from: usize,
    ) -> Result<(), CoreError> {
        let id = conv.id;
        let out_shape = conv.out_shape(&x.shape)?;
        let y_u_bytes = 4 * out_shape.iter().product::<usize>() as u64;
        let req = Request::ConvForwardShared {
            layer: id as u32,
            from_layer: from as u32,
            train,
        };
        self.send(&req, Some(y_u_bytes))?;
        let src = std::mem::take(&mut self.layers[from].parts);
        let mut bufs = std::mem::take(&mut self.part_bufs);
        let mut proj = std::mem::take(&mut self.layers[id].proj);
        let res = (|| {
            if bufs.len() < src.len() {
                return Err(CoreError::Invalid(format!(
                    "conv {id}: the residuals of conv {from}'s parts are gone"
                )));
            }
            // Y_T per part, into the part buffers' Y_T (conv `from`'s is no longer needed; its residuals are).
            let t0 = Instant::now();
            let mut f = 0.0;
            for (s, b) in src.iter().zip(bufs.iter_mut()) {
                f += TrustedConv::forward_flops(conv, &s.lr)?;
                self.tconv.forward(conv, &s.lr, &mut b.y_t)?;
            }
            self.trusted(id, t0, f);
            let what = format!("ConvForwardShared(layer {id})");
            let frame = self.recv_conv_output(id)?;
            let p = train.then_some(&mut proj);
            let got = (&frame, out_shape.as_slice());
            let merged = self.merge_parts(conv, (&src, &bufs[..src.len()]), got, y, p, &what);
            self.client.reuse_frame(frame);
            merged
        })();
        self.layers[from].parts = src;
        self.part_bufs = bufs;
        self.layers[id].parts.clear();
        self.layers[id].proj = proj;
        self.layers[id].shared_from = Some(from);
        self.layers[id].trusted_route = false;
        res?;
        self.layers[id].rank = self.layers[from].rank;
        self.count_split_forward(conv, &x.shape);
        Ok(())
    }

    /// Y = Y_T + Y_U of a whole batch decomposed in `parts` into `y` (of `out_shape`, which the reply must
    /// have): every part's Y_T (in its buffers) is
    /// copied into its samples' rows, and Y_U — one reply for the batch, read where it lies in its frame — is
    /// added in each part's check (against the part's residual), with checks on; else in one pass that refuses
    /// non-finite values. `y` is not to be used when this fails.
    fn merge_parts(
        &mut self,
        conv: &Conv2d,
        (parts, bufs): (&[Part], &[PartBufs]),
        (frame, out_shape): (&ConvOutputFrame, &[usize]),
        y: &mut Tensor,
        mut proj: Option<&mut crate::integrity::Projection>,
        what: &str,
    ) -> Result<(), CoreError> {
        let id = conv.id;
        let y_u = frame.y_u();
        let b = parts.last().map_or(0, |p| p.samples.end);
        let per = out_shape.iter().skip(1).product::<usize>();
        let t0 = Instant::now();
        y.resize(out_shape);
        for (p, pb) in parts.iter().zip(bufs) {
            let rows = y.data.get_mut(p.samples.start * per..p.samples.end * per);
            match rows {
                Some(rows) if rows.len() == pb.y_t.len() => rows.copy_from_slice(&pb.y_t.data),
                _ => {
                    return Err(bad_reply(
                        what,
                        ProtocolError::Tensor(format!(
                            "Y_U of shape {out_shape:?} for samples {:?} with a Y_T of shape {:?}",
                            p.samples, pb.y_t.shape
                        )),
                    ))
                }
            }
        }
        if out_shape.first() != Some(&b) {
            return Err(bad_reply(
                what,
                ProtocolError::Tensor(format!("Y_U of shape {out_shape:?} for {b} samples")),
            ));
        }
        if self.checker.is_none() {
            let r = y_u
                .add_into_checked(out_shape, y)
                .map_err(|e| bad_reply(what, e));
            self.count_merge(id, t0);
            return r;
        }
        self.trusted(id, t0, 0.0);
        let words = y_u
            .words_unscanned(out_shape)
            .map_err(|e| bad_reply(what, e))?;
        for (p, pb) in parts.iter().zip(bufs) {
            let range = p.samples.start * per..p.samples.end * per;
            let (w, rows) = (&words[range.clone()], &mut y.data[range]);
            let part = (p.samples.start, b);
            let pr = proj.as_deref_mut();
            self.checked(id, |ch| {
                ch.check_forward_part_into(conv, &pb.res.data, &pb.res.shape, w, pr, rows, part)
            })
            .map_err(|e| {
                let found = y_u.first_non_finite().map(|(_, v)| v);
                name_found(what, found, out_shape, "Y_U", e)
            })?;
        }
        Ok(())
    }

    /// ∇W_T of a conv whose input was decomposed in parts (its own, or `from`'s for a shortcut conv), added into
    /// `grad` (of W's shape): each part's ∇W_T against its samples of ∇Y. Returns the FLOPs.
    pub(super) fn add_weight_grad_parts(
        &mut self,
        conv: &Conv2d,
        owner: usize,
        dy: &Tensor,
        grad: &mut Tensor,
    ) -> Result<f64, CoreError> {
        let parts = std::mem::take(&mut self.layers[owner].parts);
        let mut dy_k = std::mem::take(&mut self.dy_part);
        let res = (|| {
            let b = dy.shape.first().copied().unwrap_or(0);
            let per = dy.len().checked_div(b).unwrap_or(0);
            let mut shape = dy.shape.clone();
            let mut flops = 0.0;
            for p in &parts {
                if p.samples.end > b {
                    return Err(CoreError::Shape(format!(
                        "split backward: ∇Y of {b} samples for a forward of {} or more",
                        p.samples.end
                    )));
                }
                shape[0] = p.samples.len();
                dy_k.resize(&shape);
                dy_k.data
                    .copy_from_slice(&dy.data[p.samples.start * per..p.samples.end * per]);
                flops += TrustedConv::flops(conv, &p.lr)?;
                self.tconv.add_weight_grad(conv, &p.lr, &dy_k, grad)?;
            }
            Ok(flops)
        })();
        self.layers[owner].parts = parts;
        self.dy_part = dy_k;
        res
    }
}

#[cfg(test)]
mod tests {
    use super::part_ranges;

    #[test]
    fn parts_cover_the_batch_in_order_with_the_ends_half_the_size() {
        for b in 1..40 {
            for m in 1..12 {
                let r = part_ranges(b, m);
                let n = m.min(b);
                assert_eq!(r.len(), n);
                assert_eq!(r[0].start, 0);
                assert_eq!(r.last().unwrap().end, b);
                for w in r.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let lens: Vec<usize> = r.iter().map(|x| x.len()).collect();
                assert!(lens.iter().all(|&l| l >= 1), "b {b} m {m}: {lens:?}");
                if n >= 3 {
                    // The middle parts within one of each other (rounding), and the ends no larger than them.
                    let mid = &lens[1..n - 1];
                    let (lo, hi) = (*mid.iter().min().unwrap(), *mid.iter().max().unwrap());
                    assert!(hi - lo <= 1, "b {b} m {m}: {lens:?}");
                    assert!(lens[0] <= lo && lens[n - 1] <= lo, "b {b} m {m}: {lens:?}");
                } else {
                    assert!(lens[0].abs_diff(lens[n - 1]) <= 1, "b {b} m {m}: {lens:?}");
                }
            }
        }
        assert_eq!(part_ranges(8, 4), [0..1, 1..4, 4..7, 7..8]);
        assert_eq!(part_ranges(8, 2), [0..4, 4..8]);
        assert_eq!(
            part_ranges(32, 8),
            [0..2, 2..7, 7..11, 11..16, 16..21, 21..25, 25..30, 30..32]
        );
    }
}
