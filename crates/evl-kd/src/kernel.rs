//! Which form of a loss runs: the fused host kernels or burn tensor ops (issue 19).
//!
//! Every distillation loss with a closed-form gradient exists twice: a fused kernel in the
//! private `host` module tree (value and exact gradient in one pass over host buffers, handed to
//! autodiff as a surrogate scalar) and a "graph" form written as burn tensor ops. Both
//! compute the same function. [`Kernel`] chooses between them; every loss family's
//! configuration carries one, and [`Kernel::fused_for`] is the single place where the
//! choice is resolved.
//!
//! - [`Kernel::Auto`] (the default): fused on burn's `flex` CPU device, where the graph form
//!   pays per-op dispatch and materialises every intermediate (BENCHMARKS.md), graph
//!   elsewhere, where the fused form would cost a round trip to host memory.
//! - [`Kernel::Fused`]: the fused kernels on every device. They read their inputs back to
//!   host memory, compute on the CPU and write the value and the gradients on the inputs'
//!   device, so they work off the CPU too, at the cost of that round trip (useful to check a
//!   GPU run against the CPU kernels, rarely faster).
//! - [`Kernel::Graph`]: burn tensor ops on every device.
//!
//! Where one form does not exist for a setting the other runs, whatever the kernel says:
//! the OT loss with the unrolled plan gradient ([`crate::sinkhorn::PlanGradient::Unrolled`])
//! differentiates through the Sinkhorn iterations, which only the graph form can do. Under
//! `Auto`, ULD is fused on every device (its graph form sorts on the host anyway; see
//! [`crate::baselines::uld`]).

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Which form of a loss runs: see the [module docs](self).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernel {
    /// Fused on the `flex` CPU device, burn tensor ops elsewhere.
    #[default]
    Auto,
    /// The fused host kernels on every device (a host round trip off the CPU).
    Fused,
    /// Burn tensor ops on every device.
    Graph,
}

impl Kernel {
    /// Every kernel, in the order of their names in [`Kernel::NAMES`].
    pub const ALL: [Kernel; 3] = [Kernel::Auto, Kernel::Fused, Kernel::Graph];

    /// The names [`FromStr`], [`fmt::Display`] and serde use.
    pub const NAMES: [&'static str; 3] = ["auto", "fused", "graph"];

    /// Whether the fused host kernel runs for a loss whose inputs live where `t` does: the
    /// one decision point of every loss family.
    pub fn fused_for<const D: usize>(self, t: &Tensor<D>) -> bool {
        self.fused_if_auto(evl_models::device::on_host(t))
    }

    /// Whether the fused host kernel runs, given what [`Kernel::Auto`] means for this loss
    /// here (`auto_fused`). [`Kernel::fused_for`] passes "on the CPU device"; ULD passes
    /// `true` (fused on every device, see [`crate::baselines::uld`]).
    pub fn fused_if_auto(self, auto_fused: bool) -> bool {
        match self {
            Kernel::Auto => auto_fused,
            Kernel::Fused => true,
            Kernel::Graph => false,
        }
    }

    /// The lowercase name (`auto`, `fused`, `graph`).
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Auto => Self::NAMES[0],
            Kernel::Fused => Self::NAMES[1],
            Kernel::Graph => Self::NAMES[2],
        }
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A kernel name that is none of [`Kernel::NAMES`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelParseError(String);

impl fmt::Display for KernelParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown loss kernel {:?}: expected one of {}",
            self.0,
            Kernel::NAMES.join(", ")
        )
    }
}

impl std::error::Error for KernelParseError {}

impl FromStr for Kernel {
    type Err = KernelParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kernel::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| KernelParseError(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[test]
    fn auto_is_fused_on_the_flex_cpu_device_only_as_asked() {
        let t = Tensor::<2>::zeros([2, 3], &Device::flex());
        assert!(Kernel::Auto.fused_for(&t));
        assert!(Kernel::default().fused_for(&t));
        assert!(Kernel::Fused.fused_for(&t));
        assert!(!Kernel::Graph.fused_for(&t));
        // off the CPU device (as `Auto` sees it)
        assert!(!Kernel::Auto.fused_if_auto(false));
        assert!(Kernel::Fused.fused_if_auto(false));
        assert!(!Kernel::Graph.fused_if_auto(true));
    }

    #[test]
    fn names_parse_print_and_serialise_alike() {
        for (k, name) in Kernel::ALL.into_iter().zip(Kernel::NAMES) {
            assert_eq!(k.to_string(), name);
            assert_eq!(name.parse::<Kernel>(), Ok(k));
            let json = serde_json::to_string(&k).expect("serialises");
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<Kernel>(&json).expect("parses"), k);
        }
        let err = "gpu".parse::<Kernel>().expect_err("not a kernel");
        assert_eq!(
            err.to_string(),
            "unknown loss kernel \"gpu\": expected one of auto, fused, graph"
        );
        assert!(serde_json::from_str::<Kernel>("\"Fused\"").is_err());
    }
}
