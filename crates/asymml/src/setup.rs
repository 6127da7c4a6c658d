//! Setting up a session: the split configuration from the flags, the accelerator it reaches, and the
//! registration of the model's conv layers there.

use crate::accelerator::{self, AcceleratorHandle};
use crate::cli::SplitArgs;
use crate::values::{AcceleratorSpec, DEFAULT_ACCELERATOR_TIMEOUT};
use anyhow::{bail, Result};
use asymml_core::decomp::RankPolicy;
use asymml_core::models::Net;
use asymml_core::optim::{LrSchedule, OptimizerKind};
use asymml_trusted::remote::RemoteClient;
use asymml_trusted::split::{SplitConfig, SplitExec};
use asymml_trusted::{Mode, Session, TrainConfig};
use asymml_untrusted::Device;
use std::time::Duration;

/// The split runtime's settings, resolved from the flags: the decomposition and where the accelerator is.
#[derive(Clone, Debug)]
pub(crate) struct SplitSetup {
    pub(crate) config: SplitConfig,
    pub(crate) accelerator: AcceleratorSpec,
    /// Threads of a locally started accelerator.
    pub(crate) accelerator_threads: usize,
    /// Where a locally started accelerator computes.
    pub(crate) device: Device,
    /// Longest wait for any reply of the accelerator (`--accelerator-timeout`).
    pub(crate) timeout: Duration,
    /// How a `tcp://` accelerator is reached (`--keys`, `--insecure-plaintext-tcp`).
    pub(crate) tcp: accelerator::TcpKeys,
    /// The accelerator computes only while the trusted runtime waits for it (`bench --lockstep`).
    pub(crate) lockstep: bool,
}

impl SplitSetup {
    /// From the flags, which must name one rank policy; `threads` is the local accelerator's default.
    pub(crate) fn from_args(a: &SplitArgs, threads: usize, seed: u64) -> Result<Self> {
        let [rank] = a.rank.as_slice() else {
            bail!("--rank: give one rank policy (only `asymml bench` times several)");
        };
        let mut s = Self::with_policy(a, rank.policy, threads, seed)?;
        rank.apply(&mut s.config);
        Ok(s)
    }

    /// From the flags with the rank policy `policy`.
    pub(crate) fn with_policy(
        a: &SplitArgs,
        policy: RankPolicy,
        threads: usize,
        seed: u64,
    ) -> Result<Self> {
        let svd = crate::values::svd_method(a.svd, a.svd_iters).map_err(anyhow::Error::msg)?;
        Ok(SplitSetup {
            config: SplitConfig {
                policy,
                iters: a.svd_iters.unwrap_or(1),
                svd: Some(svd),
                nsr: a.noise,
                seed,
                basis: a.basis(),
                clip: a.clip,
                integrity: a.integrity.is_on(),
                auto_route: matches!(
                    a.route,
                    crate::values::RouteChoice::Auto | crate::values::RouteChoice::AutoWall
                ),
                route_counts_wait: a.route == crate::values::RouteChoice::AutoWall,
                micro_batches: usize::from(a.micro_batches),
                pipelined_backward: !a.no_pipelined_backward,
                ..Default::default()
            },
            accelerator: a.accelerator.clone(),
            accelerator_threads: a.accelerator_threads.unwrap_or(threads),
            device: a.accelerator_device.unwrap_or_default(),
            timeout: a.accelerator_timeout,
            tcp: accelerator::TcpKeys {
                keys: a.keys.clone(),
                insecure_plaintext: a.insecure_plaintext_tcp,
            },
            lockstep: false,
        })
    }

    /// `config` with an in-process accelerator of `threads` threads on the CPU (and the default reply
    /// timeout).
    pub(crate) fn inproc(config: SplitConfig, threads: usize) -> Self {
        SplitSetup {
            config,
            accelerator: AcceleratorSpec::InProc,
            accelerator_threads: threads,
            device: Device::Cpu,
            timeout: DEFAULT_ACCELERATOR_TIMEOUT,
            tcp: accelerator::TcpKeys::default(),
            lockstep: false,
        }
    }

    /// Starts (or reaches) the accelerator.
    pub(crate) fn start(
        &self,
    ) -> Result<(
        Box<dyn asymml_protocol::Transport + Send>,
        AcceleratorHandle,
    )> {
        let (transport, handle) = accelerator::start(
            &self.accelerator,
            self.accelerator_threads,
            self.device,
            self.timeout,
            &self.tcp,
        )?;
        if self.lockstep {
            return Ok((
                Box::new(asymml_protocol::LockstepTransport::new(transport)),
                handle,
            ));
        }
        Ok((transport, handle))
    }
}

/// A session in `mode`: trusted-only computes every conv here; split starts (or reaches) the accelerator,
/// registers the conv layers and returns the handle that keeps a local accelerator alive.
pub(crate) fn make_session(
    net: Net,
    config: TrainConfig,
    mode: Mode,
    split: &SplitSetup,
) -> Result<(Session, Option<AcceleratorHandle>)> {
    let mut session = Session::new(net, config, mode);
    let handle = attach_accelerator(&mut session, split)?;
    Ok((session, handle))
}

/// A session for inference only (the optimizer is never used).
pub(crate) fn inference_session(
    net: Net,
    mode: Mode,
    split: &SplitSetup,
) -> Result<(Session, Option<AcceleratorHandle>)> {
    let config = TrainConfig {
        optimizer: OptimizerKind::Sgd {
            momentum: 0.0,
            nesterov: false,
        },
        lr: 0.0,
        weight_decay: 0.0,
        schedule: LrSchedule::Constant,
    };
    make_session(net, config, mode, split)
}

/// With a rank table (`--rank table:FILE`): every conv of `net` is listed and every entry names one of them.
pub(crate) fn check_table(config: &SplitConfig, net: &mut Net) -> Result<()> {
    if let Some(t) = &config.table {
        let mut names = Vec::new();
        net.visit_convs(&mut |name, _| names.push(name.to_string()));
        t.check_covers(names.iter().map(String::as_str))
            .map_err(|e| anyhow::anyhow!("--rank table: {e}"))?;
    }
    Ok(())
}

/// In split mode, starts (or reaches) the accelerator and registers the session's conv layers with their
/// current weights (so call it after loading weights or a checkpoint); in untrusted-only mode, hands it the
/// whole network; nothing in trusted-only mode.
pub(crate) fn attach_accelerator(
    session: &mut Session,
    split: &SplitSetup,
) -> Result<Option<AcceleratorHandle>> {
    let (kind, wd) = (session.config.optimizer, session.config.weight_decay);
    match session.mode {
        Mode::TrustedOnly => Ok(None),
        Mode::Split => {
            check_table(&split.config, &mut session.net)?;
            let (transport, handle) = split.start()?;
            let exec = SplitExec::connect(transport, &mut session.net, split.config.clone())?;
            session.set_split_exec(exec);
            Ok(Some(handle))
        }
        Mode::UntrustedOnly => {
            if split.device != Device::Cpu {
                bail!(
                    "--mode untrusted-only runs the whole network on the CPU accelerator backend only; \
                     --accelerator-device {} is for --mode split",
                    split.device
                );
            }
            let (transport, handle) = split.start()?;
            let remote = RemoteClient::connect(transport, &mut session.net, kind, wd)?;
            session.set_remote(Box::new(remote));
            Ok(Some(handle))
        }
    }
}
