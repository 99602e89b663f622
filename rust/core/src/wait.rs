//! Bounded, interruptible waits for non-blocking fd operations.
//!
//! Every blocking call in the core is a non-blocking attempt followed, on
//! `EAGAIN`, by a `poll()` of at most [`SLICE`]. Between slices a hook runs
//! (the bindings use it to let Python handle Ctrl-C), and an optional deadline
//! turns a wait that ran out into [`Error::TimedOut`]. `EINTR` is retried.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;

use crate::error::{Error, Result};

/// The longest single `poll()`; the hook runs at least this often.
pub const SLICE: Duration = Duration::from_millis(50);

/// A hook run between poll slices; an error aborts the wait with that error.
pub type Hook<'a> = &'a mut (dyn FnMut() -> Result<()> + Send);

/// How long a blocking operation may wait, and what runs while it waits.
pub struct Waiter<'a> {
    deadline: Option<Instant>,
    hook: Option<Hook<'a>>,
}

impl std::fmt::Debug for Waiter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter").field("deadline", &self.deadline).finish_non_exhaustive()
    }
}

impl<'a> Waiter<'a> {
    /// Wait at most `timeout` in total (forever if `None`; `Some(0)` never waits).
    #[must_use]
    pub fn new(timeout: Option<Duration>) -> Self {
        Self { deadline: timeout.map(|t| Instant::now() + t), hook: None }
    }

    /// Run `hook` between poll slices.
    #[must_use]
    pub fn with_hook(mut self, hook: Hook<'a>) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Wait until `fd` is ready for `events` (or reports an error or hang-up,
    /// which the next attempt then returns).
    pub fn wait(&mut self, fd: BorrowedFd<'_>, events: PollFlags, what: &str) -> Result<()> {
        loop {
            let slice = self.next_slice(what)?;
            let ts = Timespec::try_from(slice).map_err(|_| Error::InvalidArgument("poll slice".into()))?;
            let mut pfd = [PollFd::new(&fd, events)];
            match rustix::event::poll(&mut pfd, Some(&ts)) {
                Ok(n) if n > 0 => return Ok(()),
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(Error::os(format!("poll({what})"), e)),
            }
            self.between_slices()?;
        }
    }

    /// Sleep one slice, for conditions no fd reports (e.g. a full listen backlog).
    pub fn pause(&mut self, what: &str) -> Result<()> {
        std::thread::sleep(self.next_slice(what)?);
        self.between_slices()
    }

    /// The next slice to wait, or `TimedOut` if the deadline has passed.
    fn next_slice(&self, what: &str) -> Result<Duration> {
        match self.deadline {
            None => Ok(SLICE),
            Some(end) => {
                let left = end.saturating_duration_since(Instant::now());
                if left.is_zero() { Err(Error::TimedOut(what.to_owned())) } else { Ok(left.min(SLICE)) }
            }
        }
    }

    fn between_slices(&mut self) -> Result<()> {
        match self.hook.as_mut() {
            Some(hook) => hook(),
            None => Ok(()),
        }
    }

    /// Repeat the non-blocking `attempt` until it stops failing with `EAGAIN`
    /// or `EINTR`, waiting for `events` on `fd` in between.
    pub fn retry<T>(
        &mut self,
        fd: BorrowedFd<'_>,
        events: PollFlags,
        what: &str,
        mut attempt: impl FnMut() -> rustix::io::Result<T>,
    ) -> Result<T> {
        loop {
            match attempt() {
                Ok(v) => return Ok(v),
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => self.wait(fd, events, what)?,
                Err(e) => return Err(Error::os(what, e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn times_out_and_runs_hook() {
        let (a, _b) = rustix::pipe::pipe().unwrap();
        let mut calls = 0;
        let mut hook = || {
            calls += 1;
            Ok(())
        };
        let e = Waiter::new(Some(Duration::from_millis(120)))
            .with_hook(&mut hook)
            .wait(a.as_fd(), PollFlags::IN, "read(pipe)")
            .unwrap_err();
        assert!(matches!(e, Error::TimedOut(ref s) if s == "read(pipe)"), "{e}");
        assert!(calls >= 2, "hook ran {calls} times");
    }

    #[test]
    fn hook_error_aborts() {
        let (a, _b) = rustix::pipe::pipe().unwrap();
        let mut hook = || Err(Error::Busy("stop".into()));
        let mut w = Waiter::new(None).with_hook(&mut hook);
        assert!(matches!(w.wait(a.as_fd(), PollFlags::IN, "x"), Err(Error::Busy(_))));
    }
}
