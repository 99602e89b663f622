//! Argument conversion for thread placement (`cpus=` of the guest starters).

use cprfast_core::sched::Cpus;

use crate::errors::PyResultCore;

/// `cpus=None` or a sequence of CPU numbers, checked by the core.
pub fn cpus(list: Option<Vec<usize>>) -> PyResultCore<Option<Cpus>> {
    Ok(list.map(|l| Cpus::new(&l)).transpose()?)
}
