//! System calls a signal interrupted (EINTR) tried again, a bounded number
//! of times, and the errno of an error.

use std::io;

use rustix::io::Errno;

/// How often an open, a look or a read that a signal interrupted (EINTR) is
/// tried again before the error is let through: a signal handler that runs
/// at every try is a loop, not a transient.
const EINTR_RETRIES: u32 = 64;

/// Runs `call` again while a signal interrupts it (EINTR), `EINTR_RETRIES`
/// times at most.
pub(crate) fn retry_eintr<T>(mut call: impl FnMut() -> rustix::io::Result<T>) -> io::Result<T> {
    retry_interrupted(|| call().map_err(io::Error::from))
}

/// `retry_eintr` for a std call.
pub(super) fn retry_interrupted<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut tries = 0;
    loop {
        match call() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted && tries < EINTR_RETRIES => tries += 1,
            other => return other,
        }
    }
}

/// The errno of `e`, if it has one.
pub(crate) fn errno(e: &io::Error) -> Option<Errno> {
    Errno::from_io_error(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_call_is_tried_again_a_bounded_number_of_times() {
        let mut calls = 0;
        let value = retry_eintr(|| {
            calls += 1;
            if calls < 3 {
                Err(Errno::INTR)
            } else {
                Ok(7)
            }
        });
        assert_eq!((value.unwrap(), calls), (7, 3));
        let mut calls = 0;
        let err = retry_eintr(|| -> rustix::io::Result<()> {
            calls += 1;
            Err(Errno::INTR)
        })
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
        assert_eq!(calls, EINTR_RETRIES + 1);
    }
}
