//! `KvmVm` and `probe_kvm`: the reference VMM's KVM VM with one vCPU.

use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cprfast_core::kvm::{self, Vcpu, Vm};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::errors::{CoreError, PyResultCore};
use crate::memfd::PyRegion;

fn seconds(s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s).map_err(|_| PyValueError::new_err(format!("timeout must be >= 0 seconds, not {s}")))
}

/// A KVM VM with memory slots over Regions and one vCPU running our tiny
/// 64-bit guest in a native thread (the GIL is never held while it runs).
#[pyclass(name = "KvmVm", module = "cprfast._core", frozen)]
pub struct PyKvmVm {
    vm: RwLock<Option<Arc<Vm>>>,
    vcpu: RwLock<Option<Arc<Vcpu>>>,
}

impl PyKvmVm {
    fn vm(&self) -> PyResult<Arc<Vm>> {
        let g = self.vm.read().map_err(|_| PyValueError::new_err("KvmVm lock poisoned"))?;
        g.clone().ok_or_else(|| PyValueError::new_err("KvmVm is closed"))
    }

    fn vcpu(&self) -> PyResult<Arc<Vcpu>> {
        self.vm()?;
        let g = self.vcpu.read().map_err(|_| PyValueError::new_err("KvmVm lock poisoned"))?;
        g.clone().ok_or_else(|| PyValueError::new_err("no vCPU: call create_vcpu() first"))
    }
}

#[pymethods]
impl PyKvmVm {
    /// Open /dev/kvm and create an empty VM (FeatureUnavailableError if KVM is unusable).
    #[new]
    fn new(py: Python<'_>) -> PyResultCore<Self> {
        let vm = py.detach(Vm::create)?;
        Ok(Self { vm: RwLock::new(Some(Arc::new(vm))), vcpu: RwLock::new(None) })
    }

    /// Register `region` as memory slot `slot` at `guest_addr`; returns the seconds the ioctl took.
    #[pyo3(signature = (region, slot=0, guest_addr=0, dirty_log=false))]
    fn set_memory(&self, py: Python<'_>, region: PyRef<'_, PyRegion>, slot: u32, guest_addr: u64, dirty_log: bool) -> PyResult<f64> {
        let (vm, mapping) = (self.vm()?, region.mapping()?);
        let took = py.detach(|| vm.set_memory(slot, guest_addr, mapping, dirty_log)).map_err(CoreError)?;
        Ok(took.as_secs_f64())
    }

    /// Turn KVM dirty logging of `slot` on or off; returns the seconds it took.
    fn set_dirty_log(&self, py: Python<'_>, slot: u32, on: bool) -> PyResult<f64> {
        let vm = self.vm()?;
        Ok(py.detach(|| vm.set_dirty_log(slot, on)).map_err(CoreError)?.as_secs_f64())
    }

    /// The VM fd (for KVM_GET_DIRTY_LOG); owned by this object.
    fn fileno(&self) -> PyResult<i32> {
        Ok(self.vm()?.fd().as_raw_fd())
    }

    /// The vCPU fd (kept open across a cpr-exec by an ExecKeeper); owned by this object.
    fn vcpu_fileno(&self) -> PyResult<i32> {
        Ok(self.vcpu()?.fd().as_raw_fd())
    }

    /// Create the vCPU (with the host's CPUID). Nothing runs yet.
    fn create_vcpu(&self, py: Python<'_>) -> PyResult<()> {
        let vm = self.vm()?;
        let mut g = self.vcpu.write().map_err(|_| PyValueError::new_err("KvmVm lock poisoned"))?;
        if g.is_some() {
            return Err(PyValueError::new_err("the vCPU already exists"));
        }
        *g = Some(Arc::new(py.detach(|| Vcpu::create(vm, 0)).map_err(CoreError)?));
        Ok(())
    }

    /// Boot fresh: write the guest into RAM (slot at guest address 0) and set its registers.
    fn setup_guest(&self, py: Python<'_>, hot_start: usize, hot_len: usize) -> PyResult<()> {
        let vcpu = self.vcpu()?;
        Ok(py.detach(|| vcpu.setup_guest(hot_start, hot_len)).map_err(CoreError)?)
    }

    /// Before start() and load_state(): run the guest code's read-only warm-up routine once, so
    /// the new VM's mappings exist before the guest's state arrives; False (nothing run) if RAM
    /// holds another build's guest code. Safe while another VM runs the guest in this RAM.
    fn warm_up(&self, py: Python<'_>) -> PyResult<bool> {
        let vcpu = self.vcpu()?;
        Ok(py.detach(|| vcpu.warm_up()).map_err(CoreError)?)
    }

    /// Start the vCPU thread, pinned to `cpus` if given; `paused`: parked until `resume()`.
    #[pyo3(signature = (cpus=None, *, paused=false))]
    fn start(&self, py: Python<'_>, cpus: Option<Vec<usize>>, paused: bool) -> PyResult<()> {
        let (vcpu, cpus) = (self.vcpu()?, crate::sched::cpus(cpus)?);
        Ok(py.detach(|| vcpu.start(cpus.as_ref(), paused)).map_err(CoreError)?)
    }

    /// Kick the vCPU out of KVM_RUN and wait until it is parked; returns the seconds that took.
    #[pyo3(signature = (timeout=5.0))]
    fn pause(&self, py: Python<'_>, timeout: f64) -> PyResult<f64> {
        let (vcpu, timeout) = (self.vcpu()?, seconds(timeout)?);
        Ok(py.detach(|| vcpu.pause(timeout)).map_err(CoreError)?.as_secs_f64())
    }

    /// A resume comes within `window` seconds: the parked vCPU thread spins until then instead of
    /// sleeping, so resume() needs no wake-up. Call once the vCPU's CPU is not needed otherwise.
    #[pyo3(signature = (window=0.05))]
    fn expect_resume(&self, py: Python<'_>, window: f64) -> PyResult<()> {
        let (vcpu, window) = (self.vcpu()?, seconds(window)?);
        py.detach(|| vcpu.expect_resume(window));
        Ok(())
    }

    /// Let the paused vCPU run again; returns the seconds until its thread left the parking spot.
    #[pyo3(signature = (timeout=5.0))]
    fn resume(&self, py: Python<'_>, timeout: f64) -> PyResult<f64> {
        let (vcpu, timeout) = (self.vcpu()?, seconds(timeout)?);
        Ok(py.detach(|| vcpu.resume(timeout)).map_err(CoreError)?.as_secs_f64())
    }

    /// True while the guest runs (started, not paused, not stopped on its own).
    #[getter]
    fn running(&self) -> bool {
        self.vcpu().is_ok_and(|v| v.running())
    }

    /// Why the guest stopped on its own (e.g. "KVM_EXIT_SHUTDOWN (triple fault)"), or None.
    #[getter]
    fn exit_reason(&self) -> Option<String> {
        self.vcpu().ok().and_then(|v| v.exit_reason())
    }

    /// The paused vCPU's state (registers, special registers, FPU, MSRs, events) as bytes.
    fn save_state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let vcpu = self.vcpu()?;
        let bytes = py.detach(|| vcpu.save_state()).map_err(CoreError)?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Verify and load a saved state instead of booting (StreamError if corrupt). A vCPU thread
    /// spinning for a resume (expect_resume) loads it on its own CPU: see wait_loaded().
    fn load_state(&self, py: Python<'_>, state: &[u8]) -> PyResult<()> {
        let vcpu = self.vcpu()?;
        Ok(py.detach(|| vcpu.load_state(state)).map_err(CoreError)?)
    }

    /// Wait until the vCPU thread has loaded the state load_state() gave it; raises its error
    /// (the guest must not run). Returns at once if no load is outstanding.
    fn wait_loaded(&self, py: Python<'_>) -> PyResult<()> {
        let vcpu = self.vcpu()?;
        Ok(py.detach(|| vcpu.wait_loaded()).map_err(CoreError)?)
    }

    /// Stop and join the vCPU thread, then close the VM. Idempotent.
    #[pyo3(signature = (timeout=5.0))]
    fn close(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let timeout = seconds(timeout)?;
        let vcpu = self.vcpu.write().map_err(|_| PyValueError::new_err("KvmVm lock poisoned"))?.take();
        if let Some(v) = vcpu {
            py.detach(|| v.stop(timeout)).map_err(CoreError)?;
        }
        self.vm.write().map_err(|_| PyValueError::new_err("KvmVm lock poisoned"))?.take();
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: Option<&Bound<'_, PyAny>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.close(py, 5.0)
    }
}

/// What this machine's KVM offers (never raises): available, detail, errno,
/// api_version, max_memslots, manual_dirty_log_protect2, dirty_log_ring,
/// dirty_log_ring_acq_rel, module.
#[pyfunction]
pub fn probe_kvm(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let p = py.detach(kvm::probe);
    let d = PyDict::new(py);
    d.set_item("available", p.available)?;
    d.set_item("detail", p.detail)?;
    d.set_item("errno", p.errno)?;
    d.set_item("api_version", p.api_version)?;
    d.set_item("max_memslots", p.max_memslots)?;
    d.set_item("manual_dirty_log_protect2", p.manual_dirty_log_protect2)?;
    d.set_item("dirty_log_ring", p.dirty_log_ring)?;
    d.set_item("dirty_log_ring_acq_rel", p.dirty_log_ring_acq_rel)?;
    d.set_item("module", p.module)?;
    Ok(d)
}
