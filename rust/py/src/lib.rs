//! `cprfast._core`: thin PyO3 bindings over `cprfast-core`. One file per core
//! module; each method extracts its arguments, releases the GIL around the
//! core call, and converts the result. All error mapping is in `errors.rs`.

mod errors;
mod guest_threads;
mod kvm;
mod memfd;
mod observe;

/// The extension module.
#[pyo3::pymodule(gil_used = false)]
mod _core {
    use pyo3::prelude::*;

    #[pymodule_export]
    use crate::guest_threads::PyThreadsGuest;
    #[pymodule_export]
    use crate::memfd::PyRegion;
    #[pymodule_export]
    use crate::observe::{PyObserver, PyObserverReport};

    #[pymodule_export]
    use crate::kvm::{PyKvmVm, probe_kvm};

    /// Version of the Rust core, to check that the extension matches the package.
    #[pyfunction]
    fn core_version() -> &'static str {
        env!("CARGO_PKG_VERSION")
    }
}
