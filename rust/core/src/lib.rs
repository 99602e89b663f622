//! cprfast-core: the pure-Rust half of cprfast. Everything that touches guest
//! pages or file descriptors in bulk lives here, free of Python, so it can be
//! unit-tested with `cargo test` and called with the GIL released.
//!
//! Rule for every module: never form a Rust reference or slice over memory a
//! guest or another process may be writing. Guest RAM is reached only through
//! raw pointers with volatile or `ptr::copy` access.
#![warn(missing_docs, missing_debug_implementations)]

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
compile_error!("cprfast-core supports 64-bit Linux only");

pub mod cprstate;
pub mod dirty;
pub mod error;
pub mod exec_keep;
pub mod guest_threads;
pub mod kvm;
pub mod layout;
pub mod mainstream;
pub mod memfd;
pub mod observe;
pub mod pagestream;
pub mod probe;
pub mod sched;
pub mod scm;
pub mod wait;

pub use error::{Errno, Error, Result};
