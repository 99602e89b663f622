//! Feature probes as dicts: {"available": bool, "detail": str, "errno": int | None}.

use cprfast_core::probe::{self, Probe};
use pyo3::prelude::*;
use pyo3::types::PyDict;

fn to_dict<'py>(py: Python<'py>, p: &Probe) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("available", p.available)?;
    d.set_item("detail", &p.detail)?;
    d.set_item("errno", p.errno)?;
    Ok(d)
}

/// Probe memfd, hugetlb memfds (2 MiB, 1 GiB) and soft-dirty tracking.
#[pyfunction]
pub fn probe_features(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let results = py.detach(|| {
        [
            ("memfd", probe::memfd()),
            ("hugetlb_2m", probe::hugetlb_memfd(0x20_0000)),
            ("hugetlb_1g", probe::hugetlb_memfd(0x4000_0000)),
            ("soft_dirty", probe::soft_dirty()),
        ]
    });
    let out = PyDict::new(py);
    for (name, p) in &results {
        out.set_item(*name, to_dict(py, p)?)?;
    }
    Ok(out)
}
