//! `cprfast._core`: thin PyO3 bindings over `cprfast-core`. One file per core
//! module; each method extracts its arguments, releases the GIL around the
//! core call, and converts the result. All error mapping is in `errors.rs`.

mod cprstate;
mod dirty;
mod errors;
mod exec_keep;
mod guest_threads;
mod kvm;
mod mainstream;
mod memfd;
mod observe;
mod pagestream;
mod probe;
mod sched;
mod scm;
mod wait;

/// The extension module.
#[pyo3::pymodule(gil_used = false)]
mod _core {
    use pyo3::prelude::*;

    #[pymodule_export]
    use crate::guest_threads::PyThreadsGuest;
    #[pymodule_export]
    use crate::memfd::PyRegion;
    #[pymodule_export]
    use crate::probe::probe_features;
    #[pymodule_export]
    use crate::scm::{
        PyUnixListener, connect_unix, peer_credentials, recv_fds, recvmsg_fds, send_fds, sendmsg_fds,
    };

    /// Most fds one SCM_RIGHTS message may carry (the kernel's SCM_MAX_FD).
    #[pymodule_export]
    const SCM_MAX_FD: usize = cprfast_core::scm::SCM_MAX_FD;

    #[pymodule_export]
    use crate::dirty::{PyDirtyBitmap, PyDirtySet, PyTracker, probe_write_tracking};

    #[pymodule_export]
    use crate::exec_keep::{PyExecKeeper, release_exec_keeper};

    #[pymodule_export]
    use crate::kvm::{PyKvmVm, probe_kvm};

    #[pymodule_export]
    use crate::mainstream::{PyMainStreamParser, frame_main};

    /// The main stream's constants (``cprfast.stream`` names them).
    #[pymodule_export]
    const MAIN_MAGIC: &[u8] = &cprfast_core::mainstream::MAGIC;
    #[pymodule_export]
    const MAIN_VERSION: u32 = cprfast_core::mainstream::VERSION;
    #[pymodule_export]
    const MAIN_KIND_DEVICE: u8 = cprfast_core::mainstream::KIND_DEVICE;
    #[pymodule_export]
    const MAIN_KIND_RAM: u8 = cprfast_core::mainstream::KIND_RAM;
    #[pymodule_export]
    const MAIN_KIND_END: u8 = cprfast_core::mainstream::KIND_END;
    #[pymodule_export]
    const MAIN_MAX_NAME: usize = cprfast_core::mainstream::MAX_NAME;
    #[pymodule_export]
    const MAIN_MAX_SECTION: u64 = cprfast_core::mainstream::MAX_SECTION;

    #[pymodule_export]
    use crate::cprstate::parse_cpr_state;

    #[pymodule_export]
    use crate::observe::{PyObserver, PyObserverReport};

    #[pymodule_export]
    use crate::pagestream::{
        PyStreamProgress, PyStreamStats, checksum, load_mapped, mapped_file_size, recv_pages, save_mapped, send_pages,
    };

    /// Version of the Rust core, to check that the extension matches the package.
    #[pyfunction]
    fn core_version() -> &'static str {
        env!("CARGO_PKG_VERSION")
    }
}
