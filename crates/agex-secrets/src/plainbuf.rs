//! Buffers for plaintext that never leave a copy behind: a `Vec` that grows moves its
//! bytes to a new allocation and frees the old one unwiped, so these buffers are sized
//! up front and, when they must grow after all, move into a new zeroizing buffer
//! themselves (the old one is wiped when it drops).

use std::io::Read;

use zeroize::Zeroizing;

/// An empty zeroizing buffer with room for `capacity` bytes.
pub fn with_capacity(capacity: usize) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(Vec::with_capacity(capacity))
}

/// Makes room for `more` bytes without leaving the old allocation unwiped.
pub fn reserve(buf: &mut Zeroizing<Vec<u8>>, more: usize) {
    let need = buf.len().saturating_add(more);
    if need <= buf.capacity() {
        return;
    }
    let mut bigger = with_capacity(need.max(buf.capacity().saturating_mul(2)));
    bigger.extend_from_slice(buf);
    // The old buffer is zeroized when it drops here.
    *buf = bigger;
}

/// Appends `bytes`, growing only through [`reserve`].
pub fn extend(buf: &mut Zeroizing<Vec<u8>>, bytes: &[u8]) {
    reserve(buf, bytes.len());
    buf.extend_from_slice(bytes);
}

/// Reads all of `r`; `hint` is the expected size (a file's length), so one allocation
/// usually holds it all.
pub fn read_all(r: &mut impl Read, hint: usize) -> Result<Zeroizing<Vec<u8>>, std::io::Error> {
    let mut buf = with_capacity(hint.saturating_add(1).max(64));
    loop {
        if buf.len() == buf.capacity() {
            let grow = buf.capacity();
            reserve(&mut buf, grow);
        }
        let len = buf.len();
        let cap = buf.capacity();
        buf.resize(cap, 0);
        match r.read(&mut buf[len..]) {
            Ok(0) => {
                buf.truncate(len);
                return Ok(buf);
            }
            Ok(n) => buf.truncate(len + n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => buf.truncate(len),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_more_than_the_hint() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let got = read_all(&mut data.as_slice(), 10).unwrap();
        assert_eq!(got.as_slice(), data.as_slice());
        let exact = read_all(&mut data.as_slice(), data.len()).unwrap();
        assert_eq!(exact.as_slice(), data.as_slice());
        assert_eq!(
            exact.capacity(),
            data.len() + 1,
            "one allocation when the hint is right"
        );
    }

    #[test]
    fn extend_keeps_content() {
        let mut b = with_capacity(2);
        extend(&mut b, b"abc");
        extend(&mut b, b"defgh");
        assert_eq!(b.as_slice(), b"abcdefgh");
    }
}
