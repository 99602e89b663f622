//! A tracker over one region that merges any of the dirty sources.
//!
//! `start` begins a tracking epoch (everything accumulated before is
//! discarded), each `sync` returns the OR of every enabled source since the
//! previous sync, and `stop` ends tracking and returns the mapping to its
//! untracked state. All bitmaps are one bit per host page of the region.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use super::bitmap::DirtyBitmap;
use super::kvm_log::KvmDirtyLog;
use super::uffd_wp::UffdWp;
use super::{DirtySet, words_for};
use crate::error::{Error, Result};
use crate::memfd::{Mapping, host_page_size};

/// Which sources a [`Tracker`] merges.
#[derive(Debug, Default)]
pub struct Sources<'a> {
    /// Kernel write tracking of the mapping (userfaultfd WP + `PAGEMAP_SCAN`).
    pub kernel: bool,
    /// A bitmap the VMM marks; it must have one page per host page of the region.
    pub bitmap: Option<Arc<DirtyBitmap>>,
    /// `(VM fd, slot)`: a KVM memory slot with `KVM_MEM_LOG_DIRTY_PAGES`
    /// that maps exactly this region.
    pub kvm: Option<(BorrowedFd<'a>, u32)>,
}

/// Dirty tracking of one region.
#[derive(Debug)]
pub struct Tracker {
    mapping: Arc<Mapping>,
    npages: usize,
    kernel: bool,
    bitmap: Option<Arc<DirtyBitmap>>,
    kvm: Option<KvmDirtyLog>,
    uffd: Option<UffdWp>,
    active: bool,
    syncs: u64,
    last_count: usize,
}

impl Tracker {
    /// A stopped tracker of `mapping` over `sources` (at least one).
    pub fn new(mapping: Arc<Mapping>, sources: Sources<'_>) -> Result<Self> {
        let npages = mapping.len() / host_page_size();
        if !sources.kernel && sources.bitmap.is_none() && sources.kvm.is_none() {
            return Err(Error::InvalidArgument(
                "a tracker needs at least one source: kernel, bitmap or kvm".into(),
            ));
        }
        if let Some(b) = &sources.bitmap
            && b.npages() != npages
        {
            return Err(Error::InvalidArgument(format!(
                "the bitmap has {} pages but the region has {npages} host pages",
                b.npages()
            )));
        }
        let kvm = sources.kvm.map(|(fd, slot)| KvmDirtyLog::new(fd, slot, npages)).transpose()?;
        Ok(Self {
            mapping,
            npages,
            kernel: sources.kernel,
            bitmap: sources.bitmap,
            kvm,
            uffd: None,
            active: false,
            syncs: 0,
            last_count: 0,
        })
    }

    /// Begin tracking: from now on every write is reported by the next sync.
    pub fn start(&mut self) -> Result<()> {
        if self.active {
            return Err(Error::InvalidArgument("the tracker is already started".into()));
        }
        if self.kernel {
            self.uffd = Some(UffdWp::start(Arc::clone(&self.mapping))?);
        }
        // Discard what the bitmap and the KVM log accumulated before the start.
        let mut scratch = vec![0u64; words_for(self.npages)];
        if let Some(b) = &self.bitmap {
            b.sync_into(&mut scratch);
        }
        if let Some(k) = &mut self.kvm
            && let Err(e) = k.sync_into(&mut scratch)
        {
            self.uffd = None;
            return Err(e);
        }
        self.active = true;
        Ok(())
    }

    /// Get and clear the pages written since the last sync (or the start).
    pub fn sync(&mut self) -> Result<DirtySet> {
        if !self.active {
            return Err(Error::InvalidArgument("the tracker is not started".into()));
        }
        let mut words = vec![0u64; words_for(self.npages)];
        if let Some(b) = &self.bitmap {
            b.sync_into(&mut words);
        }
        if let Some(u) = &mut self.uffd {
            u.scan_into(&mut words)?;
        }
        if let Some(k) = &mut self.kvm {
            k.sync_into(&mut words)?;
        }
        let set = DirtySet::from_words(words, self.npages)?;
        self.syncs += 1;
        self.last_count = set.count();
        Ok(set)
    }

    /// Stop tracking and un-protect the mapping. Idempotent.
    pub fn stop(&mut self) -> Result<()> {
        self.active = false;
        self.uffd.take().map_or(Ok(()), UffdWp::stop)
    }

    /// Whether the tracker is started.
    #[must_use]
    pub fn active(&self) -> bool {
        self.active
    }

    /// Syncs done so far.
    #[must_use]
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    /// Dirty pages in the last sync (for dirty-rate estimates).
    #[must_use]
    pub fn last_count(&self) -> usize {
        self.last_count
    }

    /// Pages tracked (host pages of the region).
    #[must_use]
    pub fn npages(&self) -> usize {
        self.npages
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memfd::{CreateOptions, Region};

    #[test]
    fn merges_kernel_and_bitmap_and_stops_cleanly() {
        let ps = host_page_size();
        let region = Region::create("tracker-test", 128 * ps, &CreateOptions::default()).unwrap();
        let bitmap = Arc::new(DirtyBitmap::new(128).unwrap());
        bitmap.mark(1).unwrap(); // before start: discarded
        let sources = Sources { kernel: true, bitmap: Some(Arc::clone(&bitmap)), kvm: None };
        let mut t = Tracker::new(region.mapping(), sources).unwrap();
        assert!(t.sync().is_err());
        t.start().unwrap();
        assert!(t.start().is_err());
        region.mapping().write(10 * ps, &[1]).unwrap();
        bitmap.mark_range(20, 3).unwrap();
        let s = t.sync().unwrap();
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![(10, 1), (20, 3)]);
        assert_eq!((t.syncs(), t.last_count()), (1, 4));
        assert_eq!(t.sync().unwrap().count(), 0);
        t.stop().unwrap();
        t.stop().unwrap();
        assert!(!t.active());
        t.start().unwrap();
        region.mapping().write(11 * ps, &[1]).unwrap();
        assert_eq!(t.sync().unwrap().ranges().collect::<Vec<_>>(), vec![(11, 1)]);
    }

    #[test]
    fn bad_sources_are_refused() {
        let region = Region::create("tracker-bad", 64 * host_page_size(), &CreateOptions::default()).unwrap();
        assert!(Tracker::new(region.mapping(), Sources::default()).is_err());
        let wrong = Sources { bitmap: Some(Arc::new(DirtyBitmap::new(63).unwrap())), ..Default::default() };
        assert!(Tracker::new(region.mapping(), wrong).is_err());
    }
}
