//! Optimizers and learning-rate schedules against PyTorch: `tests/fixtures/optim.safetensors`.

mod common;

use asymml_core::layers::Param;
use asymml_core::optim::{LrSchedule, Optimizer, OptimizerKind};
use common::{assert_close, assert_close_slice, fixture};

/// Three steps from `p0` with gradients `g1..g3`, compared with `<case>.p1..p3` after each step.
fn three_steps(case: &str, kind: OptimizerKind, weight_decay: f32, lr: f32) {
    let f = fixture("optim.safetensors");
    let mut opt = Optimizer::new(kind, weight_decay);
    let mut p = Param::new(f.t("p0").clone());
    for step in 1..=3 {
        p.grad = f.t(&format!("g{step}")).clone();
        opt.begin_step();
        opt.update(0, &mut p, lr);
        let key = format!("{case}.p{step}");
        assert_close(&key, &p.value, f.t(&key));
    }
    assert_eq!(opt.steps, 3);
}

#[test]
fn sgd_momentum_weight_decay() {
    let kind = OptimizerKind::Sgd {
        momentum: 0.9,
        nesterov: false,
    };
    three_steps("sgd", kind, 5e-4, 0.1);
}

#[test]
fn sgd_nesterov() {
    let kind = OptimizerKind::Sgd {
        momentum: 0.9,
        nesterov: true,
    };
    three_steps("nesterov", kind, 5e-4, 0.1);
}

#[test]
fn sgd_plain() {
    let kind = OptimizerKind::Sgd {
        momentum: 0.0,
        nesterov: false,
    };
    three_steps("plain", kind, 0.0, 0.1);
}

#[test]
fn adamw() {
    let kind = OptimizerKind::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };
    three_steps("adamw", kind, 1e-2, 1e-2);
}

/// `schedule.lr(0.1, t)` for t = 0..n against the fixture's `name` (n = its length).
fn schedule_case(name: &str, schedule: LrSchedule) {
    let f = fixture("optim.safetensors");
    let want = &f.t(name).data;
    let got: Vec<f32> = (0..want.len() as u64)
        .map(|t| schedule.lr(0.1, t))
        .collect();
    assert_close_slice(name, &got, want);
    // Per step too, so that a small rate late in the schedule is not hidden by the large early ones.
    for (t, (g, w)) in got.iter().zip(want).enumerate() {
        assert_close_slice(&format!("{name}[{t}]"), &[*g], &[*w]);
    }
}

#[test]
fn cosine_schedule() {
    schedule_case(
        "cosine_lrs",
        LrSchedule::Cosine {
            total: 10,
            min_lr: 0.001,
        },
    );
}

#[test]
fn step_schedule() {
    schedule_case(
        "step_lrs",
        LrSchedule::Step {
            every: 3,
            gamma: 0.1,
        },
    );
}
