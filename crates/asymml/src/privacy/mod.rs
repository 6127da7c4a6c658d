//! `asymml privacy`: what the untrusted accelerator can learn about the private images — the low-rank
//! structure of conv inputs, the mutual information of every stream it sees, reconstruction attacks, and the
//! privacy–accuracy trade-off. Every stream is taken from a recording of the split runtime's own messages.
//!
//! The command runs as plan → measure → report: [`plan`] checks the flags and loads the images and the model,
//! [`measure`] takes the streams and measures them (low-rank structure, mutual information, attacks),
//! [`tradeoff`] trains the model once per noise level, [`frontier`] sets each rank policy's speed beside its
//! leakage (`--frontier`), and [`report`] writes the text, JSON and PNG output.

pub(crate) mod accounting;
pub(crate) mod args;
mod attack;
mod calibrate;
mod capture;
mod frontier;
mod grid;
mod leakage;
mod lowrank;
mod measure;
mod mi;
mod plan;
mod report;
mod structure;
mod tradeoff;

use anyhow::Result;
use args::PrivacyArgs;
use plan::Plan;
use report::Report;

/// Runs `asymml privacy`.
pub fn run(mut a: PrivacyArgs) -> Result<()> {
    let threads = crate::threads::init(a.threads)?;
    // The frontier times with --batch-size as given (auto: 8 images) and includes the default rank policy.
    let frontier_batch = a.batch_size;
    if a.frontier {
        frontier::add_default_policy(&mut a)?;
    }
    let plan = Plan::resolve(a, threads)?;
    if plan.args.calibrate {
        return calibrate::run(&plan);
    }
    // Timed (or read) first: a missing bench row stops the command before the long measurements.
    let speeds = if plan.args.frontier {
        Some(frontier::speeds(&plan, frontier_batch)?)
    } else {
        None
    };
    let measured = measure::measure(&plan)?;
    let tradeoff = if plan.args.tradeoff {
        tradeoff::run(&plan, &tradeoff::leakage_of(&measured.settings))?
    } else {
        Vec::new()
    };
    let frontier = match &speeds {
        Some(sp) => frontier::entries(&plan, sp, &measured.settings, &tradeoff),
        None => Vec::new(),
    };
    let mut report = Report::new(&plan, measured, tradeoff);
    report.formal_accounting = accounting::for_privacy(&plan)?;
    report.frontier = frontier;
    report.emit(plan.args.out.as_deref(), plan.args.json)
}
