//! The CPR state parser, over `cprfast_core::cprstate`.

use cprfast_core::cprstate::{self, FdRef, Limits, Outcome};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::errors::CoreError;

/// Parse the CPR state at the start of `data`, with `fds` fds received so far
/// (``inline_fds``: cpr-transfer) and `eof` once no more input will come.
/// Returns None when more input is needed, else ``(entries, vfio, length)``:
/// entries as ``(name, id, fd)`` with name bytes and, for cpr-transfer, the
/// index of the received fd (else the fd number); vfio devices as
/// ``(name, devid, ioas_id, hwpt_id)``; length, the bytes the stream took.
/// A bad or (at ``eof``) truncated stream raises StreamError, as do names longer
/// than ``max_name`` bytes (with the NUL) and lists longer than ``max_entries``.
#[pyfunction]
#[pyo3(signature = (data, fds, *, inline_fds, eof, max_name, max_entries))]
#[allow(clippy::type_complexity)]
pub fn parse_cpr_state<'py>(
    py: Python<'py>,
    data: &[u8],
    fds: usize,
    inline_fds: bool,
    eof: bool,
    max_name: u32,
    max_entries: usize,
) -> PyResult<Option<(Bound<'py, PyList>, Bound<'py, PyList>, usize)>> {
    let Outcome::Done(parsed) = cprstate::parse(data, fds, inline_fds, eof, Limits { max_name, max_entries }).map_err(CoreError)? else {
        return Ok(None);
    };
    let entries = PyList::empty(py);
    for e in parsed.entries {
        let fd: i64 = match e.fd {
            FdRef::Received(i) => i as i64,
            FdRef::Number(n) => i64::from(n),
        };
        entries.append((PyBytes::new(py, &e.name), e.id, fd))?;
    }
    let vfio = PyList::empty(py);
    for v in parsed.vfio {
        vfio.append((PyBytes::new(py, &v.name), v.devid, v.ioas_id, v.hwpt_id))?;
    }
    Ok(Some((entries, vfio, parsed.len)))
}
