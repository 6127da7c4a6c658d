//! `--route auto`'s check of the whole step: the settled routes against every conv on the trusted route.
//!
//! Each conv's route is chosen from what that conv costs the trusted runtime ([`super::RouteCosts`]). That
//! leaves out what a split costs the rest of the step: the layers around a split conv run while the
//! accelerator works beside them on cores that share caches and the memory bus, and find their data evicted
//! after each wait; the updated weights of the split convs go to the accelerator between steps. On two
//! shared vCPUs those costs made ResNet18 at 224 px 8 % slower split than trusted-only although every split
//! conv measured cheaper than its trusted route. So once every conv has settled, the check times whole steps
//! with the settled routes against steps with every conv on the trusted route, and where the settled routes
//! are not cheaper by [`STEP_SPLIT_MARGIN`] and by more than the steps' own spread makes the comparison
//! uncertain ([`STEP_SPLIT_ERRORS`]), every conv takes the trusted route.

/// Steps of each kind (the settled routes, every conv trusted) the check measures before it compares them
/// (the first step of a kind after the other pays for its buffers).
pub(super) const STEP_TRIALS: u32 = 3;

/// The costs compared are each kind's median over its last this many steps: a split step's cost varies much
/// more than a trusted one's (the accelerator's work beside it), so the least would flatter the split
/// (ResNet18 at 224 px: settled steps of 0.25–0.37 s against trusted ones of 0.31–0.35 s), and a benchmark's
/// or a user's step is a typical one.
const STEP_WINDOW: usize = 5;

/// How much cheaper a step with the settled routes must have measured than one with every conv trusted for
/// the check to keep them, at least: a fiftieth (a tie is not worth the residuals that leave).
const STEP_SPLIT_MARGIN: f64 = 0.02;

/// And by at least this many standard errors of the difference of the two medians, estimated from the spread
/// of each kind's recent steps ([`Costs::median_error`]): on a machine whose steps vary by a tenth, a
/// difference of a few per cent between medians of three to five steps says nothing, and the split kept on
/// one was slower than trusted-only in the timed steps after it (ResNet34 at 224 px, `schedule`: the check's
/// medians 2–5 % apart, the timed steps 0.86× and 0.88× trusted-only's). Where the steps are steady, the
/// margin alone decides.
const STEP_SPLIT_ERRORS: f64 = 2.0;

/// The kind not taken is tried again on two steps at check steps 96, 192, 384, … (offset from the convs' own
/// retries at 64, 128, 256, … so that the two do not coincide): a comparison made on a few noisy steps is
/// not final.
const STEP_RETRY_FROM: u32 = 96;

/// The check's state (see the module's doc).
#[derive(Clone, Debug, Default)]
pub(super) struct StepCheck {
    /// The kind of step measured: the first step's input shape and whether it trains (steps of another kind,
    /// such as an evaluation between training steps, take the check's decision but are not measured).
    key: Option<(Vec<usize>, bool)>,
    /// Per conv, the settled route (true: trusted) the `settled` steps were measured with: a change of the
    /// settled routes starts their measurement again.
    routes: Vec<bool>,
    /// The steps measured with the settled routes, and those with every conv on the trusted route.
    settled: Costs,
    trusted: Costs,
    /// Steps planned with the convs settled (the clock of the retries).
    steps: u32,
    /// The kind tried in a retry (true: every conv trusted), for its second step.
    retry: Option<bool>,
    /// The step being run: every conv trusted by the check's choice, and (with that) the last step of a trial
    /// of the trusted kind (the convs that would split let go of their own buffers after their last use in it).
    forced: bool,
    last_trusted_trial: bool,
    /// What the step being run is measured as (`Some(true)`: every conv trusted).
    measuring: Option<bool>,
}

/// One kind's measured steps: the last [`STEP_WINDOW`] costs, and how many were measured.
#[derive(Clone, Debug, Default, PartialEq)]
struct Costs {
    recent: std::collections::VecDeque<f64>,
    n: u32,
}

impl Costs {
    fn push(&mut self, cost: f64) {
        if self.recent.len() == STEP_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(cost);
        self.n += 1;
    }

    /// The median of the recent costs (the mean of the middle two of an even count; `None` before any).
    fn median(&self) -> Option<f64> {
        median_of(self.recent.iter().copied().collect())
    }

    /// The standard error of [`Self::median`] as an estimate of a typical step's cost: the spread of the
    /// recent costs as their median absolute deviation (× 1.4826, the standard deviation where they are
    /// normal, robust to one outlier such as a step that pays for its buffers), × 1.2533 / √n for the median of
    /// n. `None` before any.
    fn median_error(&self) -> Option<f64> {
        let m = self.median()?;
        let mad = median_of(self.recent.iter().map(|c| (c - m).abs()).collect())?;
        Some(1.4826 * 1.2533 * mad / (self.recent.len() as f64).sqrt())
    }
}

/// The median of `v` (the mean of the middle two of an even count; `None` if empty).
fn median_of(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let k = v.len();
    match k {
        0 => None,
        _ if !k.is_multiple_of(2) => Some(v[k / 2]),
        _ => Some(0.5 * (v[k / 2 - 1] + v[k / 2])),
    }
}

/// What the check has measured and chosen, for the statistics (and `bench --json`'s `route_check`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct RouteCheck {
    /// Median trusted time of a step with the settled routes, and with every conv on the trusted route, over
    /// the last few of each (seconds; `None` before one was measured).
    pub settled_s: Option<f64>,
    pub trusted_s: Option<f64>,
    /// How much cheaper the settled routes' median had to be to be kept (seconds): the margin, or more where
    /// the steps' spread makes the difference of the medians uncertain (`None` before both were measured).
    pub needed_s: Option<f64>,
    /// Every conv takes the trusted route: the settled routes did not measure cheaper.
    pub all_trusted: bool,
}

impl StepCheck {
    /// The key of a step with input shape `shape`; whether it is of the kind measured (the first step's kind).
    pub(super) fn measures(&mut self, shape: &[usize], train: bool) -> bool {
        let key = self.key.get_or_insert_with(|| (shape.to_vec(), train));
        key.0 == shape && key.1 == train
    }

    /// Closes the step being run at trusted cost `cost` (see [`super::step_cost`]).
    pub(super) fn close(&mut self, cost: f64) {
        match self.measuring.take() {
            Some(true) => self.trusted.push(cost),
            Some(false) => self.settled.push(cost),
            None => {}
        }
    }

    /// Plans the next step. `routes`: each conv's settled route (true: trusted), `None` while some conv still
    /// tries its routes; `all_trusted`: the convs' own routes put every conv on the trusted route in it;
    /// `measured`: it is of the kind measured ([`Self::measures`]). Returns whether the check puts every conv
    /// on the trusted route in it.
    pub(super) fn plan(
        &mut self,
        routes: Option<&[bool]>,
        all_trusted: bool,
        measured: bool,
    ) -> bool {
        self.forced = false;
        self.last_trusted_trial = false;
        self.measuring = None;
        if all_trusted {
            // A trial of the trusted route by every conv at once, or convs settled there: the trusted kind.
            self.measuring = measured.then_some(true);
            return false;
        }
        let Some(routes) = routes else {
            return false;
        };
        if !measured {
            self.forced = self.falls_back();
            return self.forced;
        }
        if routes != self.routes.as_slice() {
            self.routes = routes.to_vec();
            self.settled = Costs::default();
        }
        let n = self.steps;
        self.steps += 1;
        self.forced = if self.settled.n < STEP_TRIALS {
            false
        } else if self.trusted.n < STEP_TRIALS {
            self.last_trusted_trial = self.trusted.n + 1 == STEP_TRIALS;
            true
        } else if is_retry(n) {
            // The retried kind is measured afresh: its older steps may be from another spell of the machine.
            let other = !self.falls_back();
            self.retry = Some(other);
            if other {
                self.trusted.recent.clear();
            } else {
                self.settled.recent.clear();
            }
            other
        } else if n > 0 && is_retry(n - 1) {
            let again = self.retry.take().unwrap_or_else(|| self.falls_back());
            self.last_trusted_trial = again;
            again
        } else {
            self.falls_back()
        };
        self.measuring = Some(self.forced);
        self.forced
    }

    /// The check puts every conv on the trusted route in the step being run.
    pub(super) fn forced(&self) -> bool {
        self.forced
    }

    /// Conv `id` takes the trusted route in this step by the check's choice, in the last step of a trial of
    /// it, and would split with the settled routes: it lets go of its own buffers after their last use.
    pub(super) fn releases(&self, id: usize) -> bool {
        self.last_trusted_trial && self.routes.get(id) == Some(&false)
    }

    /// How much cheaper than the trusted kind's median the settled routes' must be to be kept: the larger of
    /// [`STEP_SPLIT_MARGIN`] of their own median and [`STEP_SPLIT_ERRORS`] standard errors of the
    /// difference. `None` before both kinds were measured.
    fn needed(&self) -> Option<f64> {
        let (s, e_s) = (self.settled.median()?, self.settled.median_error()?);
        let e_t = self.trusted.median_error()?;
        Some((STEP_SPLIT_MARGIN * s).max(STEP_SPLIT_ERRORS * e_s.hypot(e_t)))
    }

    /// Both kinds are measured and the settled routes were not cheaper by what is [`Self::needed`].
    fn falls_back(&self) -> bool {
        if self.settled.n < STEP_TRIALS || self.trusted.n < STEP_TRIALS {
            return false;
        }
        match (self.settled.median(), self.trusted.median(), self.needed()) {
            (Some(s), Some(t), Some(need)) => t - s <= need,
            _ => false,
        }
    }

    /// For the statistics.
    pub(super) fn report(&self) -> RouteCheck {
        RouteCheck {
            settled_s: self.settled.median(),
            trusted_s: self.trusted.median(),
            needed_s: self.needed(),
            all_trusted: self.falls_back(),
        }
    }
}

/// Check step `n` is the first of a retry: 96, 192, 384, …
fn is_retry(n: u32) -> bool {
    n >= STEP_RETRY_FROM && n.is_multiple_of(3) && (n / 3).is_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `steps` planned steps with the convs settled on `routes`, each kind at its cost; the kinds taken.
    fn run(c: &mut StepCheck, steps: usize, routes: &[bool], settled: f64, trusted: f64) -> String {
        let mut kinds = String::new();
        for _ in 0..steps {
            let forced = c.plan(Some(routes), false, true);
            kinds.push(if forced { 'T' } else { 'S' });
            c.close(if forced { trusted } else { settled });
        }
        kinds
    }

    #[test]
    fn trusted_trials_count_and_the_settled_routes_are_measured_against_them() {
        let mut c = StepCheck::default();
        assert!(c.measures(&[8, 3, 32, 32], true));
        // The convs' trials: three split steps (not measured), three with every conv trusted (measured).
        for _ in 0..3 {
            assert!(!c.plan(None, false, true));
            c.close(9.0);
        }
        for cost in [5.0, 4.0, 4.1] {
            assert!(!c.plan(None, true, true));
            c.close(cost);
        }
        assert_eq!((c.trusted.median(), c.trusted.n), (Some(4.1), 3));
        // Settled with conv 1 split: three settled steps, then the cheaper kind.
        let routes = [true, false, true];
        assert_eq!(run(&mut c, 3, &routes, 4.5, 4.0), "SSS");
        assert!(c.falls_back());
        assert_eq!(run(&mut c, 4, &routes, 4.5, 4.0), "TTTT");
        let r = c.report();
        assert_eq!(
            (r.settled_s, r.trusted_s, r.all_trusted),
            (Some(4.5), Some(4.0), true)
        );
        // Where the settled routes are cheaper by more than the margin, they stay.
        let mut c = StepCheck::default();
        for _ in 0..3 {
            c.plan(None, true, true);
            c.close(4.0);
        }
        assert_eq!(run(&mut c, 6, &routes, 3.0, 4.0), "SSSSSS");
        assert!(!c.report().all_trusted);
        // Within it (3.95 × 1.02 > 4.0), every conv trusted.
        let mut c = StepCheck::default();
        for _ in 0..3 {
            c.plan(None, true, true);
            c.close(4.0);
        }
        assert_eq!(run(&mut c, 5, &routes, 3.95, 4.0), "SSSTT");
    }

    #[test]
    fn without_trusted_samples_the_trusted_kind_is_tried_after_the_settled_one() {
        let mut c = StepCheck::default();
        c.measures(&[2], false);
        let routes = [false, false];
        let kinds: String = (0..8)
            .map(|i| {
                let forced = c.plan(Some(&routes), false, true);
                // Only the last trusted trial lets the would-be split convs' buffers go.
                assert_eq!(c.releases(0), i == 5, "step {i}");
                c.close(if forced { 2.0 } else { 3.0 });
                if forced {
                    'T'
                } else {
                    'S'
                }
            })
            .collect();
        assert_eq!(kinds, "SSSTTTTT");
        // A conv on the trusted route in the settled routes has no split buffers to let go of.
        assert!(!StepCheck {
            last_trusted_trial: true,
            routes: vec![true],
            ..Default::default()
        }
        .releases(0));
    }

    #[test]
    fn the_median_of_the_last_five_steps_is_compared() {
        let mut k = Costs::default();
        assert_eq!(k.median(), None);
        for v in [9.0, 1.0, 3.0, 2.0] {
            k.push(v);
        }
        assert_eq!(k.median(), Some(2.5));
        k.push(8.0);
        assert_eq!(k.median(), Some(3.0));
        // The oldest (9.0) leaves the window.
        k.push(0.5);
        assert_eq!((k.median(), k.n), (Some(2.0), 6));
        // One fast settled step among slow ones does not make the split look cheaper than a trusted step.
        let mut c = StepCheck::default();
        c.measures(&[1], true);
        for cost in [2.0, 2.0, 2.0] {
            c.plan(None, true, true);
            c.close(cost);
        }
        for cost in [1.0, 2.5, 2.6] {
            assert!(!c.plan(Some(&[false]), false, true));
            c.close(cost);
        }
        assert!(c.plan(Some(&[false]), false, true));
    }

    #[test]
    fn a_difference_within_the_steps_spread_falls_back() {
        // The median's standard error: MAD × 1.4826 × 1.2533 / √n.
        let mut k = Costs::default();
        for v in [2.0, 2.1, 1.9] {
            k.push(v);
        }
        let e = k.median_error().unwrap();
        assert!(
            (e - 0.1 * 1.4826 * 1.2533 / 3f64.sqrt()).abs() < 1e-12,
            "{e}"
        );
        assert_eq!(Costs::default().median_error(), None);
        let trial = |c: &mut StepCheck, costs: [f64; 3]| {
            c.measures(&[1], false);
            for cost in costs {
                c.plan(None, true, true);
                c.close(cost);
            }
        };
        let settled = |c: &mut StepCheck, costs: [f64; 3]| -> bool {
            for cost in costs {
                assert!(!c.plan(Some(&[false]), false, true));
                c.close(cost);
            }
            c.plan(Some(&[false]), false, true)
        };
        // 10 % cheaper by the medians (1.8 against 2.0), but the steps of both kinds spread by about as much:
        // every conv trusted (the margin alone would have kept the split).
        let mut c = StepCheck::default();
        trial(&mut c, [2.0, 2.1, 1.9]);
        assert!(settled(&mut c, [1.8, 2.2, 1.7]));
        let r = c.report();
        assert!(r.all_trusted && r.needed_s.unwrap() > 0.2, "{r:?}");
        const { assert!(1.8 * (1.0 + STEP_SPLIT_MARGIN) < 2.0) };
        // The same medians from steady steps: kept, the margin deciding.
        let mut c = StepCheck::default();
        trial(&mut c, [2.0, 2.0, 2.0]);
        assert!(!settled(&mut c, [1.8, 1.8, 1.8]));
        let r = c.report();
        assert!(
            !r.all_trusted && (r.needed_s.unwrap() - 0.036).abs() < 1e-12,
            "{r:?}"
        );
        // Spread steps, but cheaper by far more than it: kept.
        let mut c = StepCheck::default();
        trial(&mut c, [2.0, 2.1, 1.9]);
        assert!(!settled(&mut c, [1.0, 1.3, 1.1]));
        // One step that pays for its buffers (3.0) among steady ones does not count as spread.
        let mut c = StepCheck::default();
        trial(&mut c, [3.0, 2.0, 2.0]);
        assert!(!settled(&mut c, [1.8, 1.8, 1.8]));
    }

    #[test]
    fn a_change_of_the_settled_routes_is_measured_again() {
        let mut c = StepCheck::default();
        c.measures(&[2], false);
        assert_eq!(run(&mut c, 6, &[false, false], 3.0, 2.0), "SSSTTT");
        assert!(c.falls_back());
        // Conv 1 settles on the trusted route (its own trusted cost fell): the new routes get three steps.
        assert_eq!(run(&mut c, 5, &[false, true], 1.5, 2.0), "SSSSS");
        assert!(!c.report().all_trusted);
    }

    #[test]
    fn other_kinds_of_step_take_the_decision_unmeasured() {
        let mut c = StepCheck::default();
        assert!(c.measures(&[8, 3, 32, 32], true));
        assert!(!c.measures(&[3, 3, 32, 32], false));
        assert_eq!(run(&mut c, 6, &[false], 3.0, 2.0), "SSSTTT");
        // An evaluation forward: every conv trusted, as decided, and its time counts to neither kind.
        assert!(c.plan(Some(&[false]), false, false));
        c.close(0.1);
        assert_eq!((c.settled.n, c.trusted.n), (3, 3));
        // Before the decision, it follows the convs' routes.
        let mut c = StepCheck::default();
        c.measures(&[1], true);
        assert!(!c.plan(Some(&[false]), false, false));
    }

    #[test]
    fn the_kind_not_taken_is_tried_again_on_two_steps() {
        let mut c = StepCheck::default();
        c.measures(&[1], true);
        // A slow spell during the settled trials: every conv trusted from step 6 on.
        let kinds = run(&mut c, 96, &[false], 3.0, 2.0);
        assert_eq!(&kinds[..6], "SSSTTT");
        assert!(kinds[6..].chars().all(|k| k == 'T'));
        // At 96 and 97 the settled routes are tried again, measured afresh; they now cost 1.0 and are kept.
        let kinds = run(&mut c, 10, &[false], 1.0, 2.0);
        assert_eq!(kinds, "SSSSSSSSSS");
        // At 192 and 193 the trusted kind is tried again (the second step lets the buffers go), and not kept.
        let mut tried = Vec::new();
        for n in 106..400 {
            let forced = c.plan(Some(&[false]), false, true);
            if forced {
                tried.push((n, c.releases(0)));
            }
            c.close(if forced { 2.0 } else { 1.0 });
        }
        assert_eq!(
            tried,
            [(192, false), (193, true), (384, false), (385, true)]
        );
        assert!(is_retry(96) && is_retry(192) && !is_retry(64) && !is_retry(128) && !is_retry(97));
    }
}
