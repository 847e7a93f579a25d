//! Writing a file's content given in pieces, with as few `writev` calls as
//! the kernel allows (a state file of thousands of leases is a hundred
//! pieces, written where they are kept rather than copied into one buffer).

use std::io::{self, IoSlice, Write};

/// Writes every byte of `pieces`, in order, retrying after EINTR.
pub(crate) fn write_all(out: &mut impl Write, pieces: &[IoSlice<'_>]) -> io::Result<()> {
    let mut left = pieces.to_vec();
    let mut left = &mut left[..];
    IoSlice::advance_slices(&mut left, 0);
    while !left.is_empty() {
        match out.write_vectored(left) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut left, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes at most 3 bytes per call, as a short write would.
    struct Short(Vec<u8>, usize);

    impl Write for Short {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(b)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.1 += 1;
            if self.1.is_multiple_of(2) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(3 - n);
                self.0.extend_from_slice(&b[..take]);
                n += take;
                if n == 3 {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn short_and_interrupted_writes_still_write_every_piece_in_order() {
        let pieces = ["", "ab", "", "cdefg", "h", "", "ijklmnop", ""];
        let slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p.as_bytes())).collect();
        let mut out = Short(Vec::new(), 0);
        write_all(&mut out, &slices).unwrap();
        assert_eq!(out.0, b"abcdefghijklmnop");
        let mut none = Short(Vec::new(), 0);
        write_all(&mut none, &[IoSlice::new(b"")]).unwrap();
        assert!(none.0.is_empty());
    }
}
