//! Which device computes the accelerator's convolutions: `cpu`, or a CUDA GPU (`cuda`, `cuda:N`; only in a
//! binary built with the `cuda` feature).

use crate::backend::{BackendError, ConvBackend, CpuBackend};
use std::fmt;
use std::str::FromStr;

/// The accelerator's device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Device {
    /// The CPU backend (the service's own thread pool).
    #[default]
    Cpu,
    /// CUDA device number N (cuDNN convolutions; needs the `cuda` feature and the CUDA libraries at run time).
    Cuda(usize),
}

impl Device {
    /// Whether this binary can use the device at all (a CUDA device needs the `cuda` feature).
    pub fn compiled_in(&self) -> bool {
        match self {
            Device::Cpu => true,
            Device::Cuda(_) => cfg!(feature = "cuda"),
        }
    }

    /// An error saying so when this binary cannot use the device (a CUDA device without the `cuda` feature).
    pub fn check_compiled_in(&self) -> Result<(), BackendError> {
        if self.compiled_in() {
            Ok(())
        } else {
            Err(BackendError::Device(format!(
                "accelerator device {self}: this asymml binary was built without the `cuda` feature; \
                 rebuild it with `cargo build --release --features cuda` to use a CUDA GPU"
            )))
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = String;

    /// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`; case and surrounding spaces do not matter.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        let bad = || {
            format!(
                "unknown accelerator device '{s}' (use cpu, cuda or cuda:N with N a device number)"
            )
        };
        match t.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match t.strip_prefix("cuda:") {
                Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                    n.parse().map(Device::Cuda).map_err(|_| bad())
                }
                _ => Err(bad()),
            },
        }
    }
}

/// Opens the conv backend of `device`; `threads` sizes the CPU backend's pool (0: all cores). A CUDA device
/// in a binary built without the `cuda` feature, or one that is missing (no driver, no cuDNN, no such GPU),
/// is an error that says so.
pub fn open_backend(device: Device, threads: usize) -> Result<Box<dyn ConvBackend>, BackendError> {
    match device {
        Device::Cpu => Ok(Box::new(CpuBackend::new(threads)?)),
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => Ok(Box::new(crate::cuda::CudaBackend::new(ordinal, threads)?)),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(device
            .check_compiled_in()
            .err()
            .unwrap_or_else(|| BackendError::Device(format!("{device}: unavailable")))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!(" CPU ".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:0".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("CUDA:3".parse::<Device>(), Ok(Device::Cuda(3)));
        assert_eq!("cuda:12".parse::<Device>(), Ok(Device::Cuda(12)));
    }

    #[test]
    fn rejects_other_names() {
        for s in [
            "",
            "gpu",
            "cuda:",
            "cuda:-1",
            "cuda:+1",
            "cuda:x",
            "cuda:0:1",
            "cuda0",
            "cuda 0",
            "rocm",
            "cpu:0",
            "cuda:99999999999999999999999",
        ] {
            let e = s.parse::<Device>().unwrap_err();
            assert!(e.contains("cpu, cuda or cuda:N"), "{s}: {e}");
        }
    }

    #[test]
    fn display_round_trips() {
        for d in [Device::Cpu, Device::Cuda(0), Device::Cuda(7)] {
            assert_eq!(d.to_string().parse::<Device>(), Ok(d));
        }
    }

    #[test]
    fn cpu_opens() {
        let b = open_backend(Device::Cpu, 1).unwrap();
        assert_eq!(b.num_layers(), 0);
        assert!(b.describe().starts_with("cpu"));
    }

    /// Without the feature, or on a machine without a GPU, a CUDA device is a clean error naming CUDA.
    #[test]
    fn cuda_is_a_clean_error_when_unavailable() {
        match open_backend(Device::Cuda(0), 1) {
            Ok(b) => {
                // A machine with a working GPU and the feature: the backend opened.
                assert!(b.describe().starts_with("cuda:0"), "{}", b.describe());
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.to_lowercase().contains("cuda"), "{msg}");
                if !cfg!(feature = "cuda") {
                    assert!(msg.contains("without the `cuda` feature"), "{msg}");
                }
            }
        }
        // A device number far beyond any machine's.
        if let Err(e) = open_backend(Device::Cuda(4096), 1) {
            assert!(e.to_string().to_lowercase().contains("cuda"), "{e}");
        } else {
            panic!("cuda:4096 opened");
        }
    }
}
